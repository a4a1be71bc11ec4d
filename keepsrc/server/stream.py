"""What SotW and delta streams share: identifying the node, the ACK/NACK bookkeeping, and the
order in which a stream brings its Envoy to the current snapshot.

Every stream converges by one rule, `sync()`, run after each request and each snapshot change:

- one response in flight per type: the next one waits for the ACK or NACK of the last, so every
  answer refers to exactly one response and a NACK can never be lost behind a later ACK;
- make before break: types go in the order clusters, endpoints, listeners, routes, and a type
  whose update waits (its last response unanswered) holds back the types after it;
- removals go out only once every update is answered and no rejection stands, listeners first,
  so nothing still in use loses the cluster or route it points at;
- a cluster pushed in CDS is followed by its endpoints (EDS) even when they did not change:
  Envoy re-warms a modified cluster and leaves warming only on a ClusterLoadAssignment response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from keepsrc.server import metrics
from keepsrc.server.auth import Authorizer, peer_identity, proxy_identity
from keepsrc.server.cache import Entry, Nack, NodeStatus, SnapshotCache
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SHORT_NAMES, Resource

log = logging.getLogger("keepsrc.server")

ALL_TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
PUSH_ORDER = ALL_TYPES  # make before break: what a resource refers to goes before it
REMOVAL_ORDER = (LISTENER, ROUTE, CLUSTER, ENDPOINT)  # break after make: users go before what they use
# type -> the types whose resources point at it
USERS = {LISTENER: (), ROUTE: (LISTENER,), CLUSTER: (LISTENER, ROUTE), ENDPOINT: (CLUSTER,)}
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})  # LDS/CDS: Envoy asks for everything
CANONICAL_TYPES = {t: t for t in ALL_TYPES}
# A subscription naming more resources than this is refused: Envoy names what it was served, so only
# a broken or hostile client gets near it, and the names are held for as long as the stream lives.
MAX_SUBSCRIBED_NAMES = 100_000
MAX_LOGGED_UNKNOWN_TYPES = 8  # per stream: a client sending junk type URLs is logged, not the junk
_PUSHES = {t: metrics.XDS_PUSHES.labels(SHORT_NAMES[t]) for t in ALL_TYPES}
_PUSH_TIME = {t: metrics.XDS_PUSH_TIME.labels(SHORT_NAMES[t]) for t in ALL_TYPES}
_CONFIG_SIZE = {t: metrics.XDS_CONFIG_SIZE.labels(SHORT_NAMES[t]) for t in ALL_TYPES}
_REJECTS = {t: metrics.XDS_REJECTS.labels(SHORT_NAMES[t]) for t in ALL_TYPES}


def short(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


class StreamError(Exception):
    """The client broke the protocol; the stream ends with `code`."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Subscription:
    """One type on one stream. Protocols add what their client holds."""

    wildcard: bool
    nonce: str = ""  # of the last response; an ACK or NACK must echo it
    outstanding: bool = False  # the last response is not answered yet
    version: str = ""  # version of the client's state after the last response (or reported on reconnect)
    # The Entry for which this subscription has nothing left to send (removals included); None
    # when a request, NACK or refresh may have changed that. Spares a scan of the resources on
    # every ACK of a large snapshot.
    settled: Entry | None = None
    # On reconnect the client reported holding something this server did not serve: maybe newer
    # (this replica lags), so it is replaced only once the store says this server is current.
    diverged: bool = False


class Stream:
    """One xDS stream (ADS or a single type). Subclasses implement on_request, plan and send."""

    # Thousands of these live for as long as their Envoys are connected.
    __slots__ = ("_converging", "_denied", "_dirty", "_keys", "_lock", "_pusher", "_runner", "_trigger",
                 "_unknown_types", "authorizer", "cache", "context", "entry", "identity", "node_cluster", "node_id",
                 "refresh", "status", "subscriptions", "type_urls", "variant")

    variant_name = ""  # per-type streams of this protocol: which resource variant they get

    def __init__(
        self, cache: SnapshotCache, context: grpc.aio.ServicerContext, type_urls: tuple[str, ...],
        authorizer: Authorizer | None = None,
    ) -> None:
        self.cache = cache
        self.context = context
        self.authorizer = authorizer  # None: plaintext, every client is served the entry it names
        self.identity: str | None = None  # the client certificate's SPIFFE ID, with an authorizer
        self._denied: str | None = None
        self._runner: asyncio.Task[Any] | None = None
        self.type_urls = type_urls  # the types this service may carry
        # ADS streams get the snapshot as built; per-type ones the variant without ADS config sources.
        self.variant = "" if len(type_urls) > 1 else self.variant_name
        self.node_id = ""
        self.node_cluster = ""
        self.status: NodeStatus | None = None
        self.entry: Entry | None = None
        self.subscriptions: dict[str, Any] = {}  # type URL -> the protocol's Subscription
        # EDS clusters just pushed in CDS whose endpoints must follow, changed or not.
        self.refresh: set[str] = set()
        # Rebound, not added to: almost no stream ever has one, and an empty set is 216 bytes.
        self._unknown_types: frozenset[str] = frozenset()
        self._lock = asyncio.Lock()
        self._dirty = False
        self._pusher: asyncio.Task[None] | None = None
        self._keys: tuple[str, ...] = ()
        self._trigger = 0.0  # monotonic time of the change or request the next response answers
        self._converging: float | None = None  # creation time of an entry not yet fully ACKed

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        self._runner = asyncio.current_task()
        try:
            while True:
                request = await self.context.read()
                if request is grpc.aio.EOF:
                    return
                if self.status is None:
                    self._identify(request)
                type_url = self._type_of(request)
                if type_url is None:
                    continue
                self._trigger = time.monotonic()
                async with self._lock:
                    self.on_request(type_url, request)
                    await self.sync()
        except StreamError as exc:
            log.warning("node %s: %s; closing the stream", self.node_id or "?", exc)
            await self.context.abort(exc.code, str(exc))
        except asyncio.CancelledError:
            if self._denied is None:
                raise
            await self.context.abort(grpc.StatusCode.PERMISSION_DENIED, self._denied)
        finally:
            if self._pusher is not None:
                self._pusher.cancel()
            self.cache.unwatch(self, self._keys)
            if self.status is not None:
                metrics.XDS_CONNECTED.labels(self.variant_name).dec()
                self.status.streams -= 1
                if self.status.streams == 0:
                    log.info("node %s disconnected", self.node_id)
                    # Fleets churn through node ids (pods); keep state only for connected nodes.
                    self.cache.forget(self.status)

    def _type_of(self, request: Any) -> str | None:
        """The request's type; None for a type ADS does not serve, which is ignored (the stream stays)."""
        type_url: str = request.type_url
        if len(self.type_urls) == 1:
            # A per-type service implies its type; go-control-plane fills an empty one in too.
            if type_url in ("", self.type_urls[0]):
                return self.type_urls[0]
            raise StreamError(f"type {type_url!r} is not served on the {short(self.type_urls[0])} service")
        if type_url in self.type_urls:
            # The constant, not the request's copy: it keys this stream's subscriptions and its
            # node's status for as long as the stream lives (about 90 bytes a type a stream).
            return CANONICAL_TYPES[type_url]
        # An Envoy asking ADS for secrets (SDS) or runtime (RTDS) keeps everything else it gets from
        # us; closing the stream would leave it with no config at all.
        if type_url not in self._unknown_types and len(self._unknown_types) < MAX_LOGGED_UNKNOWN_TYPES:
            self._unknown_types |= {type_url}
            log.warning("node %s asks for %r, which keepsrc does not serve; ignoring it (the stream goes on)",
                        self.node_id, type_url[:200])
        return None

    def _identify(self, request: Any) -> None:
        if not self.cache.loaded:
            raise StreamError("no topology is loaded yet; try again shortly", grpc.StatusCode.UNAVAILABLE)
        node = request.node
        if not node.id and not node.cluster:
            raise StreamError("the first request carries no node id or cluster")
        self.node_id, self.node_cluster = node.id, node.cluster
        self.status = self.cache.node_status(node.id, node.cluster)
        self.status.streams += 1
        metrics.XDS_CONNECTED.labels(self.variant_name).inc()
        self._keys = tuple(k for k in dict.fromkeys((node.id, node.cluster)) if k)
        self.cache.watch(self, self._keys)
        if self.authorizer is not None:
            self.identity = peer_identity(self.context)
        self.entry = self.cache.resolve(node.id, node.cluster)
        denied = self._denial()
        if denied is not None:
            raise StreamError(denied, grpc.StatusCode.PERMISSION_DENIED)
        self._log_entry(None)

    def _denial(self) -> str | None:
        """Why this client may not have the entry its node resolves to; None if it may (or no entry yet)."""
        if self.authorizer is None or self.entry is None:
            return None
        entry = self.entry
        if self.authorizer.may_have(self.identity, entry.key, entry.snapshot.identities):
            return None
        metrics.XDS_DENIED.inc()
        self.entry = None  # not a byte of it goes out
        return (f"certificate identity {self.identity or '(none, or more than one SPIFFE ID)'} may not be served "
                f"proxy entry {entry.key!r} (node.id {self.node_id!r}, node.cluster {self.node_cluster!r}); "
                f"it may be served to {proxy_identity(self.authorizer.trust_domain, entry.key)} and the entry's "
                "`identities`")

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
        """Called by the cache; coalesces bursts of changes into one sync at a time."""
        self._dirty = True
        self._trigger = time.monotonic()
        if self._pusher is None:
            self._pusher = asyncio.get_running_loop().create_task(self._push_loop())

    async def _push_loop(self) -> None:
        try:
            while self._dirty:
                self._dirty = False
                async with self._lock:
                    previous = self.entry
                    self.entry = self.cache.resolve(self.node_id, self.node_cluster)
                    denied = self._denial()
                    if denied is not None:
                        log.warning("node %s: %s; closing the stream", self.node_id, denied)
                        self._denied = denied
                        if self._runner is not None:
                            self._runner.cancel()
                        return
                    if self.entry is not previous:
                        self._log_entry(previous)
                        if self.entry is not None and previous is not None:
                            self._converging = self.entry.created
                    await self.sync()
        except (grpc.aio.AioRpcError, RuntimeError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            # The stream went away mid-push; run() is finishing it.
            log.debug("node %s: push aborted: %s", self.node_id, exc)
        except Exception as exc:
            # gRPC raises its own ExecuteBatchError for a write to a stream that just went away;
            # anything else is a bug, and must not pass quietly.
            if self.context.done():
                log.debug("node %s: push aborted: %r", self.node_id, exc)
            else:
                log.exception("node %s: push failed", self.node_id)
        finally:
            self._pusher = None

    # -- convergence ------------------------------------------------------------------------
    async def sync(self) -> None:
        """Send what the client lacks, in make-before-break order, one response per type in flight."""
        entry, status = self.entry, self.status
        if entry is None or status is None:
            return
        waiting = False
        for type_url in PUSH_ORDER:
            sub = self.subscriptions.get(type_url)
            if sub is None:
                continue
            if type_url == LISTENER and self._clusters_warming():
                waiting = True
            if sub.outstanding or waiting:
                # Its update (if any) waits for the answer in flight; so does every later type's.
                has_update = self.plan(type_url, sub, removals=False) is not None
                status.of(type_url).waiting = has_update
                waiting = waiting or has_update
                continue
            response = self.plan(type_url, sub, removals=False)
            if response is not None and sub.diverged:
                if not await self._is_current():
                    status.of(type_url).waiting = waiting = True
                    continue
                sub.diverged = False
            status.of(type_url).waiting = False
            if response is not None:
                await self.send(type_url, sub, response)
        if waiting or any(sub.outstanding for sub in self.subscriptions.values()):
            return
        for type_url, sub in self.subscriptions.items():
            if status.of(type_url).nack is not None:
                self._settle(type_url, sub)
        # After a NACK the client holds a mix of old and new we cannot see into (its old listener
        # may still use the cluster the new one dropped): nothing is removed until a version it
        # accepts replaces the rejected one.
        rejected = any(status.of(t).nack is not None for t in self.subscriptions)
        removed = False
        for type_url in REMOVAL_ORDER:
            sub = self.subscriptions.get(type_url)
            if sub is None or sub.settled is entry:
                continue
            in_use = None if rejected else self._in_use(type_url)
            if in_use is None:
                # Removals wait, and the status says a newer version waits too.
                status.of(type_url).waiting = self.plan(type_url, sub, removals=True) is not None
                continue
            response = self.plan(type_url, sub, removals=True, in_use=in_use)
            if response is not None:
                removed = True
                await self.send(type_url, sub, response)
        if self._converging is not None and not removed and not rejected:
            metrics.PROXY_CONVERGENCE_TIME.observe(time.monotonic() - self._converging)
            self._converging = None

    def _in_use(self, type_url: str) -> frozenset[str] | None:
        """Names of `type_url` that resources the client holds point at, which must not be removed
        (a listener's clusters and route config, a route's clusters, an EDS cluster's endpoints);
        None while what the client holds is not known (on reconnect, before its requests say)."""
        if len(self.type_urls) == 1:
            return frozenset()  # per type: users live on other streams, with no order between them
        names: set[str] = set()
        for user_type in USERS[type_url]:
            held = self._holds(user_type)
            if held is None:
                return None
            for resource in held.values():
                if resource.references is None:
                    return None
                names.update(name for kind, name in resource.references if kind == type_url)
        return frozenset(names)

    def _holds(self, type_url: str) -> Mapping[str, Resource] | None:
        sub = self.subscriptions.get(type_url)
        if sub is not None:
            return self.client_holds(type_url, sub)
        if type_url == ROUTE:
            # No RDS subscription: none is needed if no listener the client holds names a route.
            listeners = self._holds(LISTENER)
            if listeners is None or any(r.references is None or any(kind == ROUTE for kind, _ in r.references)
                                        for r in listeners.values()):
                return None
            return {}
        return None  # an ADS Envoy always subscribes to listeners and clusters; until it has, unknown

    def client_holds(self, type_url: str, sub: Any) -> Mapping[str, Resource] | None:
        """The resources the client holds of a type, as far as this server knows; None if unknown."""
        raise NotImplementedError

    def _settle(self, type_url: str, sub: Subscription) -> None:
        """Nothing in flight or to send: if the snapshot moved off a rejected version, the client
        holds what we serve again and the NACK no longer applies."""
        assert self.status is not None
        status = self.status.of(type_url)
        if status.nack is not None and not self.still_rejected(type_url, sub):
            log.info("node %s: %s is back at a version it holds (%s); the NACK no longer applies",
                     self.node_id, short(type_url), sub.version)
            status.nack, status.sent, status.acked = None, sub.version, sub.version

    async def _is_current(self) -> bool:
        freshness = self.cache.freshness
        if freshness is None or await freshness():
            return True
        log.info("node %s holds a config this server did not serve, and the store has a newer revision "
                 "than %s: holding it back until this server catches up", self.node_id, self.cache.revision)
        return False

    def _clusters_warming(self) -> bool:
        """Listeners and routes wait while a CDS response is unanswered or a cluster it carried has
        not had its endpoints sent: Envoy would take a listener that points at a warming cluster,
        and fail its connections until the cluster is ready."""
        clusters = self.subscriptions.get(CLUSTER)
        if clusters is not None and clusters.outstanding:
            return True
        if not self.refresh or self.subscriptions.get(ENDPOINT) is None or self.entry is None:
            return False
        # A cluster the snapshot dropped meanwhile gets no endpoints: nothing to wait for.
        eds = self.entry.of_type(ENDPOINT, self.variant)
        self.refresh.intersection_update(eds)
        return bool(self.refresh)

    def plan(self, type_url: str, sub: Any, removals: bool, in_use: frozenset[str] = frozenset()) -> Any:
        """The response that brings the client to the current snapshot, or None if it needs none.
        Without `removals`, resources that are gone stay (SotW) or are not removed yet (delta);
        with them, those `in_use` still stay. Sets `sub.settled` when nothing is left at all."""
        raise NotImplementedError

    async def send(self, type_url: str, sub: Any, response: Any) -> None:
        raise NotImplementedError

    def on_request(self, type_url: str, request: Any) -> None:
        """Apply a request to the type's subscription (ACK, NACK, names); sync() answers it."""
        raise NotImplementedError

    def clusters_pushed(self, names: Iterable[str]) -> None:
        """CDS just carried these clusters: Envoy re-warms each and waits for its endpoints."""
        if ENDPOINT not in self.type_urls or self.entry is None:
            return
        eds = self.entry.of_type(ENDPOINT, self.variant)
        fresh = [name for name in names if name in eds]
        if fresh:
            self.refresh.update(fresh)
            sub = self.subscriptions.get(ENDPOINT)
            if sub is not None:
                sub.settled = None

    # -- ACK/NACK bookkeeping (both protocols) ----------------------------------------------
    def answer(self, type_url: str, sub: Subscription, request: Any) -> bool:
        """If `request` answers the response in flight, record the ACK or NACK; True if it did."""
        if not sub.outstanding or request.response_nonce != sub.nonce:
            return False
        sub.outstanding = False
        if request.HasField("error_detail"):
            self._record_nack(type_url, sub.version, sub.nonce, request.error_detail)
            self.rejected(type_url, sub)
            endpoints = self.subscriptions.get(ENDPOINT)
            if type_url == CLUSTER and endpoints is not None and not endpoints.wildcard:
                # A cluster the client refused gets no EDS subscription: listeners must not wait for it.
                self.refresh.intersection_update(endpoints.names)
        else:
            self.accepted(type_url, sub)
            self._record_ack(type_url, sub.version, sub.nonce, still_rejected=self.still_rejected(type_url, sub))
        return True

    def rejected(self, type_url: str, sub: Any) -> None:
        """The client refused the response in flight (protocol hook)."""

    def accepted(self, type_url: str, sub: Any) -> None:
        """The client took the response in flight (protocol hook)."""

    def still_rejected(self, type_url: str, sub: Any) -> bool:
        """Whether a past NACK still describes the client: what it refused is what we serve."""
        raise NotImplementedError

    def record_sent(self, type_url: str, version: str, size: int) -> None:
        assert self.status is not None
        status = self.status.of(type_url)
        status.sent = version
        status.responses += 1
        _PUSHES[type_url].inc()
        _PUSH_TIME[type_url].observe(time.monotonic() - self._trigger)
        _CONFIG_SIZE[type_url].observe(size)

    def record_held(self, type_url: str, version: str) -> None:
        """On (re)connect the client reports what it holds: that is both sent and ACKed."""
        assert self.status is not None
        status = self.status.of(type_url)
        status.sent = status.acked = version
        log.info("node %s: holds %s version %s", self.node_id, short(type_url), version,
                 extra={"node": self.node_id, "type": short(type_url), "version": version})

    def _record_ack(self, type_url: str, version: str, nonce: str, still_rejected: bool) -> None:
        assert self.status is not None
        status = self.status.of(type_url)
        if status.acked != version or status.nack is not None:
            log.info("node %s: ACK %s version %s", self.node_id, short(type_url), version,
                     extra={"node": self.node_id, "type": short(type_url), "version": version, "nonce": nonce})
        status.acked = version
        if not still_rejected:
            status.nack = None

    def _record_nack(self, type_url: str, version: str, nonce: str, error: Any) -> None:
        """`error` is the request's google.rpc.Status error_detail: Envoy's reason for rejecting."""
        assert self.status is not None
        status = self.status.of(type_url)
        status.nack = Nack(version, error.code, error.message, time.time())
        _REJECTS[type_url].inc()
        log.warning("node %s: NACK %s version %s (keeps %s): code %d: %s", self.node_id, short(type_url),
                    version, status.acked or "nothing", error.code, error.message,
                    extra={"node": self.node_id, "type": short(type_url), "version": version, "nonce": nonce,
                           "code": error.code})

    def check_names(self, type_url: str, count: int) -> None:
        if count > MAX_SUBSCRIBED_NAMES:
            raise StreamError(f"a {short(type_url)} subscription of {count} names is over the limit of "
                              f"{MAX_SUBSCRIBED_NAMES}", grpc.StatusCode.RESOURCE_EXHAUSTED)
