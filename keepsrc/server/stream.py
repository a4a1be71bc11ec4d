"""What SotW and delta streams share: identifying the node, watching its snapshot, serialized pushes."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from keepsrc.server.cache import Entry, Nack, NodeStatus, SnapshotCache
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SHORT_NAMES

log = logging.getLogger("keepsrc.server")

ALL_TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})  # LDS/CDS: Envoy asks for everything
# Removals go out only after the adds of the same push were answered, listeners first so nothing
# still in use loses the cluster or route it points at.
REMOVAL_ORDER = (LISTENER, ROUTE, CLUSTER, ENDPOINT)


def short(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


class StreamError(Exception):
    """The client broke the protocol; the stream ends with INVALID_ARGUMENT."""


class Stream:
    """One xDS stream (ADS or a single type). Subclasses implement on_request and respond."""

    # Thousands of these live for as long as their Envoys are connected.
    __slots__ = ("_dirty", "_keys", "_lock", "_pusher", "cache", "context", "entry", "node_cluster", "node_id",
                 "removals_pending", "status", "subscriptions", "type_urls", "variant")

    variant_name = ""  # per-type streams of this protocol: which resource variant they get

    def __init__(
        self, cache: SnapshotCache, context: grpc.aio.ServicerContext, type_urls: tuple[str, ...]
    ) -> None:
        self.cache = cache
        self.context = context
        self.type_urls = type_urls  # the types this service may carry
        # ADS streams get the snapshot as built; per-type ones the variant without ADS config sources.
        self.variant = "" if len(type_urls) > 1 else self.variant_name
        self.node_id = ""
        self.node_cluster = ""
        self.status: NodeStatus | None = None
        self.entry: Entry | None = None
        self.removals_pending = False
        # type URL -> the subclass's subscription (each has `outstanding`)
        self.subscriptions: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._dirty = False
        self._pusher: asyncio.Task[None] | None = None
        self._keys: tuple[str, ...] = ()

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                request = await self.context.read()
                if request is grpc.aio.EOF:
                    return
                if self.status is None:
                    self._identify(request)
                if request.type_url not in self.type_urls:
                    raise StreamError(f"type {request.type_url!r} is not served on this stream")
                async with self._lock:
                    await self.on_request(request)
        except StreamError as exc:
            log.warning("node %s: %s; closing the stream", self.node_id or "?", exc)
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            if self._pusher is not None:
                self._pusher.cancel()
            self.cache.unwatch(self, self._keys)
            if self.status is not None:
                self.status.streams -= 1
                if self.status.streams == 0:
                    log.info("node %s disconnected", self.node_id)
                    # Fleets churn through node ids (pods); keep state only for connected nodes.
                    self.cache.forget(self.status)

    def _identify(self, request: Any) -> None:
        node = request.node
        if not node.id and not node.cluster:
            raise StreamError("the first request carries no node id or cluster")
        self.node_id, self.node_cluster = node.id, node.cluster
        self.status = self.cache.node_status(node.id, node.cluster)
        self.status.streams += 1
        self._keys = tuple(k for k in dict.fromkeys((node.id, node.cluster)) if k)
        self.cache.watch(self, self._keys)
        self.entry = self.cache.resolve(node.id, node.cluster)
        self._log_entry(None)

    def _log_entry(self, previous: Entry | None) -> None:
        assert self.status is not None
        if self.entry is None:
            self.status.key = None
            if previous is None:
                log.warning(
                    "node %s (cluster %r) is not in the topology: no proxy entry named after its node.id "
                    "or node.cluster; it will be served as soon as one is added",
                    self.node_id, self.node_cluster,
                )
            else:
                log.warning("node %s: proxy entry %r was removed; the Envoy keeps its last config",
                            self.node_id, previous.key)
        elif previous is None or previous.key != self.entry.key:
            self.status.key = self.entry.key
            log.info("node %s: served proxy entry %r", self.node_id, self.entry.key)

    # -- snapshot changes -------------------------------------------------------------------
    def snapshot_changed(self) -> None:
        """Called by the cache; coalesces bursts of changes into one push at a time."""
        self._dirty = True
        if self._pusher is None:
            self._pusher = asyncio.get_running_loop().create_task(self._push_loop())

    async def _push_loop(self) -> None:
        try:
            while self._dirty:
                self._dirty = False
                async with self._lock:
                    previous = self.entry
                    self.entry = self.cache.resolve(self.node_id, self.node_cluster)
                    if self.entry is not previous:
                        self._log_entry(previous)
                    if self.entry is not None:
                        await self.push()
        except (grpc.aio.AioRpcError, RuntimeError, asyncio.InvalidStateError) as exc:
            # The stream went away mid-push; run() is finishing it.
            log.debug("node %s: push aborted: %s", self.node_id, exc)
        finally:
            self._pusher = None

    # -- bookkeeping shared by both protocols -----------------------------------------------
    def record_sent(self, type_url: str, version: str) -> None:
        assert self.status is not None
        status = self.status.of(type_url)
        status.sent = version
        status.responses += 1

    def record_ack(self, type_url: str, version: str) -> None:
        assert self.status is not None
        status = self.status.of(type_url)
        if status.acked != version or status.nack is not None:
            log.info("node %s: ACK %s version %s", self.node_id, short(type_url), version)
        status.acked = version
        status.nack = None

    def record_nack(self, type_url: str, version: str, error: Any) -> None:
        """`error` is the request's google.rpc.Status error_detail: Envoy's reason for rejecting."""
        assert self.status is not None
        status = self.status.of(type_url)
        status.nack = Nack(version, error.code, error.message, time.time())
        log.warning("node %s: NACK %s version %s (keeps %s): code %d: %s", self.node_id, short(type_url),
                    version, status.acked or "nothing", error.code, error.message)

    def record_in_sync(self, type_url: str, version: str) -> None:
        """Delta: the snapshot came back to what the node holds, so a past NACK no longer applies."""
        assert self.status is not None
        status = self.status.of(type_url)
        if status.acked == version and status.nack is not None:
            log.info("node %s: %s is back at the ACKed version %s", self.node_id, short(type_url), version)
            status.sent, status.nack = version, None

    async def on_request(self, request: Any) -> None:
        raise NotImplementedError

    async def respond(self, type_url: str, sub: Any, send_removals: bool) -> bool:
        """Send this type if it changed; True if removals were held back (send_removals False)."""
        raise NotImplementedError

    async def push(self) -> None:
        """A new snapshot: send every subscribed type in make-before-break order, removals later."""
        removals = False
        for type_url in ALL_TYPES:
            sub = self.subscriptions.get(type_url)
            if sub is not None:
                removals |= await self.respond(type_url, sub, send_removals=False)
        self.removals_pending = self.removals_pending or removals
        await self.finish_removals()

    async def finish_removals(self) -> None:
        """Once every response of the push is answered, send what removes the resources gone."""
        if not self.removals_pending or any(s.outstanding for s in self.subscriptions.values()):
            return
        self.removals_pending = False
        for type_url in REMOVAL_ORDER:
            sub = self.subscriptions.get(type_url)
            if sub is not None:
                await self.respond(type_url, sub, send_removals=True)
