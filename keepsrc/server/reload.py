"""A Store -> SnapshotCache: on start, on every change the store reports, and on SIGHUP.

The store is a file (`keepsrc serve FILE`, watched with inotify), the built-in example, or etcd
shared by replicas (`keepsrc serve --store etcd://...`); all go through this one path. Invalid
content never reaches the cache: its errors are logged as name:line:col and the last good
snapshots stay in service until later content fixes it. A store that cannot be reached changes
nothing either.

Reloads run off the event loop: validating and building a 5,000-service topology takes seconds,
and every xDS stream is served by the loop. Only the swap into the cache runs on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from keepsrc.netplan.check import host_findings
from keepsrc.server import metrics
from keepsrc.server.cache import SnapshotCache
from keepsrc.snapshots.builder import build_snapshots
from keepsrc.snapshots.snapshot import Snapshot
from keepsrc.snapshots.tls import write_secret_files
from keepsrc.store import BuiltinStore, Content, FileStore, LocalStore, Store, StoreError, check_content
from keepsrc.topology.diagnostics import Severity
from keepsrc.topology.loader import cycle_collection_paused

log = logging.getLogger("keepsrc.server")

# A fleet reconnecting at once asks whether this replica is current; one store read answers all
# of them for this long (and a new load always asks again).
FRESHNESS_TTL_S = 0.5


@dataclass(frozen=True, slots=True)
class _Prepared:
    generation: int
    revision: int | None
    # None: the content is what was loaded last time; only its revision is new.
    snapshots: Mapping[str, Snapshot] | None


class TopologySource:
    """Loads the topology from `store` into the cache. A path means a file store, None the
    built-in example (never reloaded)."""

    def __init__(self, cache: SnapshotCache, store: Store | Path | None) -> None:
        self.cache = cache
        if store is None:
            store = BuiltinStore()
        elif isinstance(store, Path):
            store = FileStore(store)
        self.store = store
        self.loads = 0  # successful loads, for tests and `status`
        # The store revision of the last content acted on: loaded, refused or unchanged. A replica
        # is current when the store has nothing newer.
        self.processed: int | None = None
        # Loads never overlap: `load()` from any thread and the reload task take this lock.
        self._loading = threading.Lock()
        self._attempted: tuple[str, bool] | None = None  # (sha256, loaded) of the last content tried
        self._generations = itertools.count(1)  # a read older than the one swapped in is dropped
        self._swapped = 0
        self._served: Mapping[str, Snapshot] = {}
        self._reloader: asyncio.Task[None] | None = None
        self._again = False  # a reload was asked for while one ran
        self._force = False
        self._freshness: tuple[float, int | None, bool] | None = None  # (when, processed, answer)
        self._asking: tuple[int | None, asyncio.Task[bool]] | None = None  # (processed, its read)
        if store.shared:
            cache.freshness = self.is_current

    @property
    def name(self) -> str:
        return self.store.name

    def load(self) -> bool:
        """Validate, build and swap in one step, on this thread; False (old snapshots kept) on any error.

        For the first load from a local store; reloads from a running server go through `reload`
        or `reload_soon`, which keep the event loop free (and are the only way to read etcd).
        """
        if not isinstance(self.store, LocalStore):
            raise TypeError(f"{self.name} is read on the event loop: use `await reload(force=True)`")
        prepared = self._prepare(next(self._generations), self.store.read_now(), force=True)
        if prepared is None:
            return False
        self._swap_in(prepared)
        return True

    def reload_soon(self, force: bool = False) -> asyncio.Task[None]:
        """Read the store, then validate and build in a worker thread, then swap in on this loop.

        Reloads are serialized: asked for while one runs, they make one more after it, however
        many were asked for. Unless `force`d (SIGHUP), content that is what the last load read is
        not loaded again.
        """
        self._again = True
        self._force |= force
        if self._reloader is None or self._reloader.done():
            self._reloader = asyncio.get_running_loop().create_task(self._reload_while_asked())
        return self._reloader

    async def reload(self, force: bool = False) -> None:
        """`reload_soon`, and wait until it (and any reload asked for meanwhile) is done."""
        # shield: a caller that gives up waiting must not cancel a load other callers asked for.
        await asyncio.shield(self.reload_soon(force))

    async def _reload_while_asked(self) -> None:
        while self._again:
            force, self._again, self._force = self._force, False, False
            generation = next(self._generations)
            try:
                content = await self.store.read()
            except StoreError as exc:
                state = "no snapshot is served yet" if self.loads == 0 else "keeping the last good snapshots"
                log.warning("%s; %s", exc, state)
                continue
            try:
                prepared = await asyncio.to_thread(self._prepare, generation, content, force)
            except Exception:  # a bug in one load must not end hot reload for the server's lifetime
                log.exception("reloading %s failed; keeping the last good snapshots", content.name)
                continue
            if content.revision is not None:
                # Before the swap: the streams it wakes ask `is_current`, which must know.
                self.processed = max(self.processed or 0, content.revision)
            if prepared is not None:
                self._swap_in(prepared)

    def _prepare(self, generation: int, content: Content, force: bool) -> _Prepared | None:
        """Validate and build (any thread); None to keep what is served as it is."""
        if content.empty:
            if self.loads:
                log.warning("%s holds no topology now; keeping the last good snapshots", self.name)
            else:
                log.warning("%s holds no topology yet; nothing is served until one is pushed "
                            "(keepsrc push FILE --store %s)", self.name, self.name)
            return None
        with self._loading, cycle_collection_paused():
            digest = None if content.data is None else hashlib.sha256(content.data).hexdigest()
            if digest is not None and not force and self._attempted is not None and digest == self._attempted[0]:
                loaded = self._attempted[1]
                if loaded and content.revision is not None and content.revision != self.cache.revision:
                    # The same bytes pushed again: served as they are, at the new revision.
                    return _Prepared(generation, content.revision, None)
                log.debug("%s: content unchanged; nothing to load", content.name)
                return None
            started = time.monotonic()
            topology, diagnostics = check_content(content)
            for diagnostic in diagnostics:
                (log.error if diagnostic.severity is Severity.ERROR else log.warning)("%s", diagnostic)
            self._attempted = (digest, topology is not None) if digest is not None else None
            if topology is None:
                kept = "no snapshot is served yet" if self.loads == 0 else "keeping the last good snapshots"
                log.error("%s is invalid (%d errors); %s", content.name,
                          sum(d.severity is Severity.ERROR for d in diagnostics), kept)
                metrics.TOPOLOGY_RELOADS.labels("invalid").inc()
                return None
            write_secret_files(topology)
            # route_localnet without the plan's 127/8 guard opens 127/8 to the network (CVE-2020-8558).
            for finding in host_findings(topology):
                log.warning("%s", finding)
            snapshots = build_snapshots(topology)
            for snapshot in snapshots.values():
                # Hashed here, off the event loop, rather than when the cache compares and serves them.
                snapshot.version_info, snapshot.size  # noqa: B018
            metrics.TOPOLOGY_RELOADS.labels("ok").inc()
            metrics.TOPOLOGY_BUILD_TIME.observe(time.monotonic() - started)
            return _Prepared(generation, content.revision, snapshots)

    def _swap_in(self, prepared: _Prepared) -> None:
        if prepared.generation < self._swapped:
            return  # a load that started later has already been swapped in
        self._swapped = prepared.generation
        if prepared.snapshots is None:
            self.cache.set_all(self._served, revision=prepared.revision)
            log.info("%s: revision %s has the content already served", self.name, prepared.revision)
            return
        self._served = prepared.snapshots
        self.cache.set_all(prepared.snapshots, revision=prepared.revision)
        self.loads += 1
        at = "" if prepared.revision is None else f" at revision {prepared.revision}"
        log.info("loaded %s%s: %d proxies (%s)", self.name, at, len(prepared.snapshots),
                 ", ".join(f"{k}@{s.version_info}" for k, s in sorted(prepared.snapshots.items())) or "none")

    async def watch(self, stop: asyncio.Event, debounce_ms: int = 200) -> None:
        """Reload on every change the store reports, until `stop` is set."""
        await self.store.watch(stop, self.reload_soon, debounce_ms)

    async def is_current(self) -> bool:
        """Whether the store has no revision newer than this replica has acted on (False when the
        store cannot be asked). The cache's `freshness`: a stream asks it before replacing a
        config this replica never served, so an Envoy that reconnects to a lagging replica keeps
        the newer config it holds."""
        cached = self._freshness
        if cached is not None and cached[1] == self.processed and time.monotonic() - cached[0] < FRESHNESS_TTL_S:
            return cached[2]
        # One read in flight answers every stream that asks meanwhile, unless a load since it
        # started changed the question.
        if self._asking is None or self._asking[1].done() or self._asking[0] != self.processed:
            self._asking = (self.processed, asyncio.get_running_loop().create_task(self._ask_store()))
        return await asyncio.shield(self._asking[1])

    async def _ask_store(self) -> bool:
        processed = self.processed
        try:
            latest = await self.store.latest_revision()
        except StoreError as exc:
            log.warning("cannot tell whether this replica is current: %s", exc)
            answer = False
        else:
            answer = latest is None or (processed is not None and latest <= processed)
        self._freshness = (time.monotonic(), processed, answer)
        return answer
