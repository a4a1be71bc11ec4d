"""A raw xDS client for conformance tests: every request is spelled out by the test, every
response is handed back as it arrived, so a sequence is played exactly as a fleet produces it.

(tests/support/xds_client.py is the opposite: an automatic client that behaves like Envoy.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import grpc
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from envoy.service.status.v3 import csds_pb2
from google.rpc.status_pb2 import Status

from keepsrc.server import SnapshotCache, csds, start
from keepsrc.server.service import PER_TYPE_SERVICES
from keepsrc.snapshots.builder import build_snapshots
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot
from keepsrc.topology import Listener, Protocol, Proxy, Route, Service, SocketAddress, Topology, Xff
from tests.support.xds_client import MESSAGES

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
CDS, EDS, LDS, RDS = CLUSTER, ENDPOINT, LISTENER, ROUTE


def edge(tcp_service: str = "a", a_port: int = 9001, a_timeout_ms: int = 1000, http: bool = True,
         extra_listener: str | None = None, xff_hops: int = 0) -> Snapshot:
    """Proxy `edge`: tcp-in (and `extra_listener`) -> `tcp_service`, http-in -> b (route config
    http-in), over EDS services."""
    services = {
        "a": Service("a", (SocketAddress("127.0.0.1", a_port),), connect_timeout_ms=a_timeout_ms),
        "b": Service("b", (SocketAddress("127.0.0.2", 9002),)),
        "c": Service("c", (SocketAddress("127.0.0.3", 9003),)),
    }
    listeners = [Listener("tcp-in", SocketAddress("127.0.0.1", 10000), Protocol.TCP, service=tcp_service)]
    if http:
        listeners.append(Listener("http-in", SocketAddress("127.0.0.1", 10080), Protocol.HTTP,
                                  routes=(Route("/", "b"),), xff=Xff(trusted_hops=xff_hops)))
    if extra_listener:
        listeners.append(Listener(extra_listener, SocketAddress("127.0.0.1", 10001), Protocol.TCP,
                                  service=tcp_service))
    used = {tcp_service, *(("b",) if http else ())}
    topology = Topology({n: s for n, s in services.items() if n in used}, {"edge": Proxy("edge", tuple(listeners))})
    return build_snapshots(topology)["edge"]


@dataclass
class Response:
    type_url: str
    version: str  # SotW version_info / delta system_version_info
    nonce: str
    names: list[str]
    removed: list[str]
    resource_versions: dict[str, str]  # delta only


class Raw:
    """One stream: ADS (`service=None`) or the per-type service of `service` (a type URL)."""

    def __init__(self, channel: grpc.aio.Channel, *, delta: bool = False, service: str | None = None,
                 node: str = "edge", cluster: str = "") -> None:
        self.delta = delta
        self.node = Node(id=node, cluster=cluster)
        if service is None:
            method = ADS + ("DeltaAggregatedResources" if delta else "StreamAggregatedResources")
        else:
            name, (_, sotw, delta_method) = next((n, v) for n, v in PER_TYPE_SERVICES.items() if v[0] == service)
            method = f"/{name}/{delta_method if delta else sotw}"
        request_class = DeltaDiscoveryRequest if delta else DiscoveryRequest
        response_class = DeltaDiscoveryResponse if delta else DiscoveryResponse
        self.call = channel.stream_stream(method, request_serializer=request_class.SerializeToString,
                                          response_deserializer=response_class.FromString)()
        self._first = True
        self._inbox: asyncio.Queue[DiscoveryResponse | DeltaDiscoveryResponse | BaseException | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def sotw(self, type_url: str, names: Iterable[str] = (), *, version: str = "", nonce: str = "",
                   error: str | None = None) -> None:
        await self._write(DiscoveryRequest(
            type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce,
            error_detail=Status(code=3, message=error) if error else None))

    async def delta_request(self, type_url: str, subscribe: Iterable[str] = (), unsubscribe: Iterable[str] = (), *,
                            nonce: str = "", error: str | None = None, initial: dict[str, str] | None = None) -> None:
        request = DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe), response_nonce=nonce,
            error_detail=Status(code=3, message=error) if error else None)
        if initial:
            request.initial_resource_versions.update(initial)
        await self._write(request)

    async def ack(self, response: Response, names: Iterable[str] | None = None) -> None:
        """ACK as Envoy does: SotW repeats the names it wants (default: those in the response)."""
        if self.delta:
            await self.delta_request(response.type_url, nonce=response.nonce)
        else:
            await self.sotw(response.type_url, response.names if names is None else names,
                            version=response.version, nonce=response.nonce)

    async def nack(self, response: Response, message: str, held_version: str = "",
                   names: Iterable[str] | None = None) -> None:
        if self.delta:
            await self.delta_request(response.type_url, nonce=response.nonce, error=message)
        else:
            await self.sotw(response.type_url, response.names if names is None else names,
                            version=held_version, nonce=response.nonce, error=message)

    async def recv(self, timeout: float = 5.0) -> Response:
        # Reads go through one background task: cancelling a pending read would cancel the call.
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_all())
        message = await asyncio.wait_for(self._inbox.get(), timeout)
        if isinstance(message, BaseException):
            raise message
        assert message is not None, "the server closed the stream"
        if self.delta:
            return Response(message.type_url, message.system_version_info, message.nonce,
                            [r.name for r in message.resources], list(message.removed_resources),
                            {r.name: r.version for r in message.resources})
        names = [_resource_name(message.type_url, a.value) for a in message.resources]
        return Response(message.type_url, message.version_info, message.nonce, names, [], {})

    async def _read_all(self) -> None:
        try:
            while (message := await self.call.read()) is not grpc.aio.EOF:
                self._inbox.put_nowait(message)
            self._inbox.put_nowait(None)
        except grpc.aio.AioRpcError as exc:
            self._inbox.put_nowait(exc)

    async def expect(self, type_url: str, timeout: float = 5.0) -> Response:
        response = await self.recv(timeout)
        assert response.type_url == type_url, f"expected a {short(type_url)} response, got {response}"
        return response

    async def quiet(self, within: float = 0.3) -> None:
        """Nothing arrives for `within` seconds (tests pair it with a probe that must arrive next)."""
        with contextlib.suppress(TimeoutError):
            response = await self.recv(within)
            raise AssertionError(f"expected nothing, got {response}")

    def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()

    async def _write(self, request: DiscoveryRequest | DeltaDiscoveryRequest) -> None:
        if self._first:
            request.node.CopyFrom(self.node)
            self._first = False
        await self.call.write(request)


def short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def _resource_name(type_url: str, body: bytes) -> str:
    message = MESSAGES[type_url].FromString(body)
    return message.cluster_name if type_url == ENDPOINT else message.name  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def served(*snapshots: tuple[str, Snapshot]) -> AsyncIterator[tuple[SnapshotCache, grpc.aio.Channel]]:
    cache = SnapshotCache()
    for key, snapshot in snapshots:
        cache.set(key, snapshot)
    server = await start(cache, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield cache, channel
    finally:
        await server.stop(None)


async def csds_status(channel: grpc.aio.Channel, node_id: str) -> dict[str, csds_pb2.ClientConfig.GenericXdsConfig]:
    """type URL -> what CSDS (and so `keepsrc status`) reports for `node_id`."""
    fetch = channel.unary_unary(
        f"/{csds.SERVICE}/FetchClientStatus",
        request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
        response_deserializer=csds_pb2.ClientStatusResponse.FromString,
    )
    response = await fetch(csds_pb2.ClientStatusRequest())
    configs = [c for c in response.config if c.node.id == node_id]
    return {x.type_url: x for c in configs for x in c.generic_xds_configs}


def status_name(config: csds_pb2.ClientConfig.GenericXdsConfig) -> str:
    return csds_pb2.ConfigStatus.Name(config.config_status)
