"""A small asyncio xDS client that subscribes and ACKs like Envoy, for tests and benchmarks/bench_ads.py.

It speaks ADS (SotW or delta) or one per-type service, follows the Envoy subscription pattern
(wildcard LDS/CDS; EDS for the EDS clusters it holds; RDS for the route configs its listeners
name) and ACKs every response, or NACKs when `reject` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import Node
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
)
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from google.rpc.status_pb2 import Status

from keepsrc.server.cache import state_version
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE

MESSAGES = {LISTENER: Listener, CLUSTER: Cluster, ROUTE: RouteConfiguration, ENDPOINT: ClusterLoadAssignment}
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
# Envoy's startup order: CDS and LDS wildcard; EDS and RDS follow from what they name.
WILDCARD = (CLUSTER, LISTENER)

# Called with (type_url, {name: message}) of each response; a string NACKs it with that message.
Reject = Callable[[str, dict[str, object]], str | None]
# Called with (client, type_url, {name: message}, removed names, NACK message or None) once a response
# is applied (or refused), before it is answered: `client.held` is what the client holds after it.
OnResponse = Callable[["XdsClient", str, dict[str, object], tuple[str, ...], str | None], None]


def _name(type_url: str, message: object) -> str:
    return message.cluster_name if type_url == ENDPOINT else message.name  # type: ignore[attr-defined]


@dataclass
class Received:
    type_url: str
    version: str  # SotW version_info, or the delta state version of what the client then held
    nonce: str
    names: tuple[str, ...]
    removed: tuple[str, ...] = ()
    nacked: bool = False
    at: float = field(default_factory=time.monotonic)


class XdsClient:
    """One xDS stream on `channel`. `ads=False` with one type in `types` uses that type's service;
    `names` then are the RDS/EDS names to ask for (over ADS they follow from CDS and LDS).

    `reject` is read on every response, so a test may replace it at any time; `on_response` sees
    every response right after it is applied, in order (tests/conformance/test_stateful.py checks
    make-before-break there)."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str, cluster: str = "", *, delta: bool = False,
                 ads: bool = True, names: tuple[str, ...] = (),
                 types: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE), reject: Reject | None = None,
                 on_ack: Callable[[XdsClient, str], None] | None = None, keep_history: bool = True,
                 on_response: OnResponse | None = None) -> None:
        self.channel = channel
        self.node = Node(id=node_id, cluster=cluster)
        self.delta = delta
        self.ads = ads
        self.names = names
        self.types = types
        self.reject = reject
        self.on_ack = on_ack
        self.on_response = on_response
        self.keep_history = keep_history
        self.held: dict[str, dict[str, object]] = {t: {} for t in types}  # type -> name -> message
        self.resource_versions: dict[str, dict[str, str]] = {t: {} for t in types}  # delta only
        self.versions: dict[str, str] = {}  # type -> version accepted last
        self.nonces: dict[str, str] = {}
        self.subscribed: dict[str, set[str]] = {}  # named types: what we asked for
        self.history: list[Received] = []
        self.changed = asyncio.Event()
        self._call: grpc.aio.StreamStreamCall | None = None
        self._first = True

    # -- public -----------------------------------------------------------------------------
    def method(self) -> str:
        if not self.ads:
            service = {
                LISTENER: "envoy.service.listener.v3.ListenerDiscoveryService/{}Listeners",
                CLUSTER: "envoy.service.cluster.v3.ClusterDiscoveryService/{}Clusters",
                ROUTE: "envoy.service.route.v3.RouteDiscoveryService/{}Routes",
                ENDPOINT: "envoy.service.endpoint.v3.EndpointDiscoveryService/{}Endpoints",
            }[self.types[0]]
            return "/" + service.format("Delta" if self.delta else "Stream")
        return ADS + ("DeltaAggregatedResources" if self.delta else "StreamAggregatedResources")

    async def run(self) -> None:
        """Subscribe and answer responses until the stream ends or the task is cancelled."""
        request_class = DeltaDiscoveryRequest if self.delta else DiscoveryRequest
        response_class = DeltaDiscoveryResponse if self.delta else DiscoveryResponse
        self._call = self.channel.stream_stream(
            self.method(), request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )()
        self._first = True
        for type_url in self.types:
            if type_url in WILDCARD:
                await self._request(type_url, subscribe=[])
            elif type_url in self.subscribed:  # a reconnect: ask again for what we hold
                await self._request(type_url, subscribe=sorted(self.subscribed[type_url]))
            elif self.names:
                await self._resubscribe(type_url, set(self.names))
        while True:
            response = await self._call.read()
            if response is grpc.aio.EOF:
                return
            await self._handle(response)

    async def wait_for(self, predicate: Callable[[XdsClient], bool], timeout: float = 10.0) -> None:
        """Wait until `predicate(self)`, re-checked on every response and every 50 ms (for
        predicates on server state, which changes after our ACK)."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.05)

    def carry_over(self, previous: XdsClient) -> None:
        """Start from what `previous` holds, as an Envoy does when its stream reconnects."""
        self.held = {t: dict(r) for t, r in previous.held.items()}
        self.resource_versions = {t: dict(v) for t, v in previous.resource_versions.items()}
        self.versions = dict(previous.versions)
        self.subscribed = {t: set(n) for t, n in previous.subscribed.items()}

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    # -- protocol ---------------------------------------------------------------------------
    async def _request(self, type_url: str, subscribe: list[str], unsubscribe: list[str] = (),  # type: ignore[assignment]
                       nonce: str = "", error: str | None = None) -> None:
        assert self._call is not None
        node = self.node if self._first else None
        self._first = False
        detail = Status(code=3, message=error) if error else None  # 3 = INVALID_ARGUMENT, as Envoy sends
        if self.delta:
            request = DeltaDiscoveryRequest(
                node=node, type_url=type_url, response_nonce=nonce, error_detail=detail,
                resource_names_subscribe=subscribe, resource_names_unsubscribe=list(unsubscribe),
            )
            if not nonce and type_url in self.resource_versions:
                request.initial_resource_versions.update(self.resource_versions[type_url])
        else:
            names = [] if type_url in WILDCARD else sorted(self.subscribed.get(type_url, ()))
            request = DiscoveryRequest(
                node=node, type_url=type_url, response_nonce=nonce, error_detail=detail,
                version_info=self.versions.get(type_url, ""), resource_names=names,
            )
        await self._call.write(request)

    async def _handle(self, response: DiscoveryResponse | DeltaDiscoveryResponse) -> None:
        type_url = response.type_url
        message_class = MESSAGES[type_url]
        if self.delta:
            parse = message_class.FromString
            items = {r.name: (r.version, parse(r.resource.value)) for r in response.resources}
            incoming = {n: m for n, (_, m) in items.items()}
        else:
            messages = [message_class.FromString(a.value) for a in response.resources]
            incoming = {_name(type_url, m): m for m in messages}
        error = self.reject(type_url, incoming) if self.reject else None
        removed = tuple(getattr(response, "removed_resources", ()))
        if error is None:
            if self.delta:
                held = self.held[type_url]
                versions = self.resource_versions[type_url]
                for name, (version, message) in items.items():
                    held[name], versions[name] = message, version
                for name in removed:
                    held.pop(name, None)
                    versions.pop(name, None)
                self.versions[type_url] = state_version(versions)
            else:
                if type_url in WILDCARD:
                    self.held[type_url] = incoming
                else:
                    self.held[type_url].update(incoming)
                self.versions[type_url] = response.version_info
        if self.keep_history:
            self.history.append(Received(type_url, self.versions.get(type_url, "") if error is None else "?",
                                         response.nonce, tuple(incoming), removed, error is not None))
        self.nonces[type_url] = response.nonce
        if self.on_response is not None:
            self.on_response(self, type_url, incoming, removed, error)
        await self._request(type_url, subscribe=[], nonce=response.nonce, error=error)
        if error is None and self.on_ack is not None:
            self.on_ack(self, type_url)
        self.changed.set()
        if error is None:
            await self._follow(type_url)

    async def _follow(self, type_url: str) -> None:
        """Subscribe EDS/RDS to what the clusters/listeners just received name, as Envoy does."""
        if type_url == CLUSTER and ENDPOINT in self.types:
            wanted = {n for n, c in self.held[CLUSTER].items() if c.type == Cluster.EDS}  # type: ignore[attr-defined]
            await self._resubscribe(ENDPOINT, wanted)
        elif type_url == LISTENER and ROUTE in self.types:
            wanted = set()
            for listener in self.held[LISTENER].values():
                for chain in listener.filter_chains:  # type: ignore[attr-defined]
                    for f in chain.filters:
                        if f.typed_config.Is(HttpConnectionManager.DESCRIPTOR):
                            hcm = HttpConnectionManager.FromString(f.typed_config.value)
                            if hcm.HasField("rds"):
                                wanted.add(hcm.rds.route_config_name)
            await self._resubscribe(ROUTE, wanted)

    async def _resubscribe(self, type_url: str, wanted: set[str]) -> None:
        before = self.subscribed.get(type_url)
        if before == wanted:
            return
        before = before or set()
        self.subscribed[type_url] = wanted
        for name in before - wanted:
            self.held[type_url].pop(name, None)
            self.resource_versions[type_url].pop(name, None)
        await self._request(type_url, subscribe=sorted(wanted - before), unsubscribe=sorted(before - wanted),
                            nonce=self.nonces.get(type_url, ""))


@contextlib.asynccontextmanager
async def running(client: XdsClient):  # type: ignore[no-untyped-def]
    """Run a client in the background for the duration of a block."""
    task = asyncio.create_task(client.run())
    try:
        yield client
    finally:
        client.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task
