"""gRPC wiring: ADS (SotW and delta) and the per-type LDS/CDS/RDS/EDS services, on grpc.aio.

Handlers are registered generically with an identity response serializer: streams write
DiscoveryResponse bytes they assembled from pre-serialized resources (see wire.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Coroutine
from typing import TYPE_CHECKING

import grpc
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from keepsrc.server import csds
from keepsrc.server.auth import Authorizer, ServerTls
from keepsrc.server.cache import SnapshotCache
from keepsrc.server.delta import DeltaStream
from keepsrc.server.sotw import SotwStream
from keepsrc.server.stream import ALL_TYPES, Stream
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE

if TYPE_CHECKING:
    from keepsrc.server.workers import Worker

log = logging.getLogger("keepsrc.server")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
# service -> (type it carries, SotW method, delta method)
PER_TYPE_SERVICES = {
    "envoy.service.listener.v3.ListenerDiscoveryService": (LISTENER, "StreamListeners", "DeltaListeners"),
    "envoy.service.cluster.v3.ClusterDiscoveryService": (CLUSTER, "StreamClusters", "DeltaClusters"),
    "envoy.service.route.v3.RouteDiscoveryService": (ROUTE, "StreamRoutes", "DeltaRoutes"),
    "envoy.service.endpoint.v3.EndpointDiscoveryService": (ENDPOINT, "StreamEndpoints", "DeltaEndpoints"),
}


def _handler(cache: SnapshotCache, stream_class: type[Stream], type_urls: tuple[str, ...],
             request_class: type[DiscoveryRequest] | type[DeltaDiscoveryRequest],
             authorizer: Authorizer | None) -> grpc.RpcMethodHandler:
    async def behavior(_requests: object, context: grpc.aio.ServicerContext) -> None:
        await stream_class(cache, context, type_urls, authorizer).run()

    return grpc.stream_stream_rpc_method_handler(
        behavior, request_deserializer=request_class.FromString, response_serializer=bytes
    )


def generic_handlers(cache: SnapshotCache, authorizer: Authorizer | None = None,
                     peers: tuple[str, ...] = ()) -> list[grpc.GenericRpcHandler]:
    """`authorizer` (with TLS): each stream is served only the proxy entry its certificate names.
    `peers`: the other workers' private sockets (CSDS lists their nodes too)."""
    handlers = [
        csds.handler(cache, authorizer, peers),
        grpc.method_handlers_generic_handler(ADS_SERVICE, {
            "StreamAggregatedResources": _handler(cache, SotwStream, ALL_TYPES, DiscoveryRequest, authorizer),
            "DeltaAggregatedResources": _handler(cache, DeltaStream, ALL_TYPES, DeltaDiscoveryRequest, authorizer),
        })
    ]
    for service, (type_url, sotw, delta) in PER_TYPE_SERVICES.items():
        handlers.append(grpc.method_handlers_generic_handler(service, {
            sotw: _handler(cache, SotwStream, (type_url,), DiscoveryRequest, authorizer),
            delta: _handler(cache, DeltaStream, (type_url,), DeltaDiscoveryRequest, authorizer),
        }))
    return handlers


class XdsServer:
    """A running xDS server; `port` is the bound port (useful with address 'host:0')."""

    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server = server
        self.port = port

    async def stop(self, grace: float | None = 1.0) -> None:
        """Close every stream (Envoys keep their config and reconnect elsewhere or later)."""
        await self.server.stop(grace)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start(cache: SnapshotCache, address: str, tls: ServerTls | None = None,
                authorizer: Authorizer | None = None, unix_mode: int = 0o660,
                unix_group: str | None = None, worker: Worker | None = None) -> XdsServer:
    """Start serving `cache` on `address` ('host:port' or 'unix:/path'); raises OSError if it cannot bind.

    With `tls`, clients must present a certificate from its CA, and each is served only the proxy
    entry its identity names (`authorizer`, default trust domain unless given); CSDS only to an
    admin identity. A unix socket gets `unix_mode` (and `unix_group`), not what the umask leaves.
    A `worker` of `serve --workers` shares the port with the other workers (workers.py).

    Until `cache` has its first snapshots, gRPC health (service "" and the ADS service) says
    NOT_SERVING and xDS streams are refused with UNAVAILABLE, so an Envoy retries (or goes to
    another replica) rather than being handed an empty config."""
    cache.bind(asyncio.get_running_loop())
    server = grpc.aio.server(options=[
        # gRPC core refuses new calls beyond 1,000 (soft) / 3,000 (hard) not yet picked up by the
        # event loop; a fleet reconnecting at once after a restart is exactly such a burst.
        ("grpc.server.max_pending_requests", 100_000),
        ("grpc.server.max_pending_requests_hard_limit", 100_000),
        # Without this a second server on the same port binds happily and steals half the Envoys;
        # workers share it on purpose, and their supervisor made sure nothing else holds it.
        ("grpc.so_reuseport", 0 if worker is None else 1),
        # Envoys hold one stream for days; let idle connections stay, but notice dead peers.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # A fleet rebalances onto a replica that came back: each connection closes after about
        # 30 minutes (gRPC adds +-10% jitter), its streams finished gracefully, and reconnects.
        ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", 30_000),
    ])
    if tls is not None and authorizer is None:
        authorizer = Authorizer()
    server.add_generic_rpc_handlers(generic_handlers(cache, authorizer, worker.peers if worker else ()))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    cache.on_loaded(lambda: _background(_set_health(health, health_pb2.HealthCheckResponse.SERVING)))
    socket_path = address[len("unix:"):] if address.startswith("unix:") else None
    # The socket is created with the process umask; tighten it for the instant until chmod.
    umask = os.umask(0o177) if socket_path else None
    try:
        port = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
        await server.start()
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    finally:
        if umask is not None:
            os.umask(umask)
    if socket_path:
        os.chmod(socket_path, unix_mode)
        if unix_group is not None:
            shutil.chown(socket_path, group=unix_group)
    shown = address if socket_path else f"{address.rsplit(':', 1)[0]}:{port}"
    security = "mutual TLS, clients authorized by SPIFFE ID" if tls else "plaintext"
    log.info("xDS server listening on %s (ADS and per-type, SotW and delta; %s)", shown, security)
    return XdsServer(server, port)


MAX_CONNECTION_AGE_MS = 30 * 60 * 1000
_tasks: set[asyncio.Task[None]] = set()


async def _set_health(health: health_aio.HealthServicer, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
    for service in ("", ADS_SERVICE):
        await health.set(service, status)


def _background(coroutine: Coroutine[None, None, None]) -> None:
    task = asyncio.get_running_loop().create_task(coroutine)
    _tasks.add(task)  # the loop keeps only a weak reference to a task
    task.add_done_callback(_tasks.discard)


async def serve(cache: SnapshotCache, address: str) -> None:
    """Serve `cache` on `address` until cancelled; for meshes that embed keepsrc."""
    server = await start(cache, address)
    try:
        await server.wait()
    finally:
        await asyncio.shield(server.stop())
