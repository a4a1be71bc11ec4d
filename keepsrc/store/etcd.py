"""etcd as the store that keepsrc replicas share: one key, `<prefix>/topology.yaml`, holding the
topology YAML as `keepsrc push` (or anyone) wrote it.

The only module that imports etcd3aio: it puts its generated protos on sys.path and ships
version-specific internals, so it stays behind this boundary (and pinned).

- Reads are linearizable; a replica loads a key's value at its mod_revision, which every replica
  reports the same (`keepsrc status`), and which orders them (see `latest_revision`).
- The watch starts from the revision a read saw, so nothing written in between is missed; etcd3aio
  resumes it from the last revision after a restart or a lost member. Any other watch error (a
  compaction, a cancel) falls back to a full re-read, as does a periodic check of the key's
  revision, which also catches a watch that went quiet without an error.
- While etcd is unreachable the server keeps what it serves; reads raise StoreError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from etcd3aio import Etcd3Client, EtcdError
from etcd3aio._protobuf import Compare  # the public helpers compare versions, not mod_revisions

from keepsrc.store.base import ConflictError, Content, Store, StoreError, until_stopped

log = logging.getLogger("keepsrc.server")

TOPOLOGY_KEY = "topology.yaml"
# etcd refuses a request over --max-request-bytes: 1.5 MiB unless its operator raised it.
DEFAULT_MAX_REQUEST_BYTES = 3 * 1024 * 1024 // 2
READ_TIMEOUT_S = 2.0
RESYNC_S = 5.0  # how often the key's revision is checked besides the watch
WATCH_RETRY_S = (0.25, 5.0)  # backoff after a watch error, first and longest


@dataclass(frozen=True)
class EtcdTls:
    """TLS to etcd: the CA that signed its certificates and, for client-certificate auth, ours."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # the name to check etcd's certificate for (default: the URL's host)


class EtcdStore(Store):
    shared = True

    def __init__(self, endpoints: list[tuple[str, int]], prefix: str, tls: EtcdTls | None = None) -> None:
        self.endpoints = endpoints
        self.prefix = prefix
        self.key = f"{prefix}/{TOPOLOGY_KEY}"
        hosts = ",".join(f"{host}:{port}" for host, port in endpoints)
        self.name = f"etcd://{hosts}{prefix}"
        self.tls = tls
        self._client: Etcd3Client | None = None
        self._last_read: int | None = None  # mod_revision of the last read (None: absent)
        self._read_failed = False
        self._changed: Callable[[], None] | None = None
        self._held = False
        self._deferred = False

    # -- connection ---------------------------------------------------------------------------
    def _connect(self) -> Etcd3Client:
        """The client, created on first use on the serving loop (a grpc.aio channel is bound to
        the loop that creates it)."""
        if self._client is None:
            # etcd3aio balances over an `ipv4:` list, which takes addresses, not names: resolve
            # here (once; the TLS check still uses the name).
            addresses = []
            for host, port in self.endpoints:
                try:
                    infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
                except OSError as exc:
                    raise StoreError(f"{self.name}: cannot resolve {host}: {exc}") from exc
                addresses += list(dict.fromkeys(f"{info[4][0]}:{port}" for info in infos))
            tls: dict[str, bytes | None] = {}
            server_name = None
            if self.tls is not None:
                tls["ca_cert"] = self.tls.ca.read_bytes()
                tls["cert_chain"] = self.tls.cert.read_bytes() if self.tls.cert else None
                tls["cert_key"] = self.tls.key.read_bytes() if self.tls.key else None
                server_name = self.tls.server_name or self.endpoints[0][0]
            self._client = Etcd3Client(addresses, tls_server_name=server_name, **tls)
        return self._client

    async def _connected(self) -> Etcd3Client:
        client = self._connect()
        if client.kv is None:
            await client.connect()
        return client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- reading ------------------------------------------------------------------------------
    async def _get(self, keys_only: bool) -> object:
        client = await self._connected()
        assert client.kv is not None
        try:
            return await client.kv.get(self.key, keys_only=keys_only, timeout=READ_TIMEOUT_S)
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise StoreError(f"{self.name}: etcd is unreachable ({exc or type(exc).__name__})") from exc

    async def read(self) -> Content:
        try:
            response = await self._get(keys_only=False)
        except StoreError:
            self._read_failed = True
            raise
        self._read_failed = False
        kvs = response.kvs  # type: ignore[attr-defined]
        if not kvs:
            self._last_read = None
            return Content(f"etcd://{self._hosts()}{self.key}", None)
        self._last_read = revision = int(kvs[0].mod_revision)
        return Content(f"etcd://{self._hosts()}{self.key}@{revision}", bytes(kvs[0].value), revision)

    async def latest_revision(self) -> int | None:
        """A linearizable read of the key's mod_revision: what the newest replica serves."""
        kvs = (await self._get(keys_only=True)).kvs  # type: ignore[attr-defined]
        return int(kvs[0].mod_revision) if kvs else None

    def _hosts(self) -> str:
        return ",".join(f"{host}:{port}" for host, port in self.endpoints)

    # -- writing (keepsrc push) ---------------------------------------------------------------
    async def write(self, data: bytes, expected: int | None) -> int:
        """Write `data` if the key is still at mod_revision `expected` (None: absent); the new
        revision. Two writers that read the same revision: exactly one wins, the other gets
        ConflictError."""
        client = await self._connected()
        assert client.kv is not None
        compare = Compare(result=Compare.EQUAL, key=self.key.encode())
        if expected is None:
            compare.target, compare.create_revision = Compare.CREATE, 0
        else:
            compare.target, compare.mod_revision = Compare.MOD, expected
        try:
            response = await client.kv.txn([compare], [client.kv.txn_op_put(self.key, data)], [],
                                           timeout=10.0, max_attempts=1)
        except grpc.aio.AioRpcError as exc:
            if "too large" in (exc.details() or ""):
                raise StoreError(
                    f"{len(data)} bytes is more than etcd takes in one request (--max-request-bytes, "
                    f"{DEFAULT_MAX_REQUEST_BYTES} bytes = 1.5 MiB unless raised on every member); "
                    "keep the topology under it") from exc
            raise StoreError(f"{self.name}: etcd refused the write: {exc.details()}") from exc
        except (EtcdError, TimeoutError) as exc:
            raise StoreError(f"{self.name}: etcd is unreachable ({exc or type(exc).__name__})") from exc
        if not response.succeeded:
            now = await self.latest_revision()
            raise ConflictError(
                f"{self.key} changed while this push ran (it was at revision {expected or 'none'}, "
                f"it is at {now or 'none (deleted)'} now): someone else pushed; check what is there "
                "and push again")
        return int(response.header.revision)

    # -- watching -----------------------------------------------------------------------------
    def hold_changes(self) -> None:
        """Stop passing changes on, as a replica whose watch lags behind would (drills and tests)."""
        self._held = True

    def release_changes(self) -> None:
        """Pass on what changed while held, and every change after it."""
        self._held = False
        if self._deferred:
            self._deferred = False
            self._notify()

    def _notify(self) -> None:
        if self._held:
            self._deferred = True
        elif self._changed is not None:
            self._changed()

    async def watch(self, stop: asyncio.Event, changed: Callable[[], None], debounce_ms: int = 200) -> None:
        self._changed = changed
        checker = asyncio.create_task(self._check_periodically(stop))
        retry = WATCH_RETRY_S[0]
        try:
            while not stop.is_set():
                try:
                    start = await self._watch_from()
                    self._notify()  # a full re-read: covers everything up to `start`
                    await until_stopped(stop, self._follow(start))
                    retry = WATCH_RETRY_S[0]
                except (StoreError, EtcdError, grpc.aio.AioRpcError) as exc:
                    log.warning("%s: watch failed (%s); reading it again in %.2f s", self.name, exc, retry)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), retry)
                    retry = min(retry * 2, WATCH_RETRY_S[1])
        finally:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker

    async def _watch_from(self) -> int:
        """The revision after the one a linearizable read sees now: a watch from it misses nothing
        the re-read that follows does not show."""
        header = (await self._get(keys_only=True)).header  # type: ignore[attr-defined]
        return int(header.revision) + 1

    async def _follow(self, start: int) -> None:
        """Until the watch ends: every event is a change. Returns on a cancel or a compaction,
        after which the caller re-reads the whole key and watches again."""
        client = await self._connected()
        assert client.watch is not None
        async for response in client.watch.watch(self.key, start_revision=start):
            if response.canceled or response.compact_revision:
                log.warning("%s: etcd ended the watch (compacted at %d: %s); reading it again",
                            self.name, response.compact_revision, response.cancel_reason or "canceled")
                return
            if response.events:
                self._notify()

    async def _check_periodically(self, stop: asyncio.Event) -> None:
        """Level-based safety net: a read that failed while etcd was away, or a watch that went
        quiet (a member cut off from the others), is caught by comparing revisions."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RESYNC_S)
            if stop.is_set():
                return
            try:
                latest = await self.latest_revision()
            except StoreError:
                continue  # still unreachable; the next check tries again
            if self._read_failed or latest != self._last_read:
                self._notify()
