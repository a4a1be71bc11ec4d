"""Envoy bootstrap files: one that points an Envoy at a keepsrc server, and a complete static one.

Both are built as typed Bootstrap protos (so a wrong field is a Python error, not an Envoy
start-up failure) and converted to plain dicts for YAML output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2

from keepsrc.snapshots.builder import cluster_resource, listener_resource, pack, socket_address, sticky_services
from keepsrc.snapshots.tls import TLS_TRANSPORT_SOCKET, sds_certificate
from keepsrc.topology.model import Certificate, Service, SocketAddress, Topology

XDS_CLUSTER = "keepsrc_xds"
# Towards replicas: Envoy's xDS reconnect backoff is 500 ms base, 30 s cap; after a replica dies
# an Envoy should find another within a second or so, not wait half a minute.
RETRY_BASE_MS = 250
RETRY_MAX_MS = 5000
# HTTP/2 pings on the xDS connection: a replica whose host vanished (no RST ever comes) is noticed
# within interval + timeout, and the stream moves to another replica.
KEEPALIVE_INTERVAL_S = 15
KEEPALIVE_TIMEOUT_S = 5


class XdsApi(StrEnum):
    SOTW = "sotw"
    DELTA = "delta"


class XdsTransport(StrEnum):
    ADS = "ads"  # one aggregated stream for every type: the ordering keepsrc pushes is kept
    PER_TYPE = "per-type"  # one stream per type (LDS, CDS, RDS, EDS) for Envoys that do not use ADS


XdsTarget = SocketAddress | PurePosixPath | Sequence[SocketAddress]


@dataclass(frozen=True)
class XdsTls:
    """Mutual TLS to keepsrc: the CA keepsrc's certificate must chain to (and the name it must carry),
    and the Envoy's own certificate and key, read through a file-based SDS secret so a renewed
    certificate is used on the next connection without a restart (as Envoy Gateway does)."""

    ca: str
    cert: str
    key: str
    server_name: str | None = None

    def certificate(self) -> Certificate:
        return Certificate(self.cert, self.key)


def _xds_tls_socket(tls: XdsTls) -> base_pb2.TransportSocket:
    validation = common_pb2.CertificateValidationContext(trusted_ca=base_pb2.DataSource(filename=tls.ca))
    if tls.server_name:
        validation.match_typed_subject_alt_names.append(common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.DNS, matcher=string_pb2.StringMatcher(exact=tls.server_name)))
    context = tls_pb2.UpstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            validation_context=validation, alpn_protocols=["h2"],
            tls_certificate_sds_secret_configs=[sds_certificate(tls.certificate())]),
        sni=tls.server_name or "",
    )
    return base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=pack(context))


def _xds_cluster(xds: PurePosixPath | tuple[SocketAddress, ...], replicas: bool,
                 tls: XdsTls | None = None) -> cluster_pb2.Cluster:
    options = protocol_pb2.Http2ProtocolOptions()
    if replicas:
        options.connection_keepalive.interval.FromSeconds(KEEPALIVE_INTERVAL_S)
        options.connection_keepalive.timeout.FromSeconds(KEEPALIVE_TIMEOUT_S)
    http2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=options
        )
    )
    # gRPC needs HTTP/2 to the management server; otherwise it is an ordinary static cluster.
    if isinstance(xds, PurePosixPath):
        # A unix socket: reachable from every network namespace on the host (a path, not an address).
        cluster = cluster_pb2.Cluster(name=XDS_CLUSTER, type=cluster_pb2.Cluster.STATIC,
                                      connect_timeout={"seconds": 1})
        endpoint = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint
        cluster.load_assignment.cluster_name = XDS_CLUSTER
        endpoint.address.pipe.path = str(xds)
    else:
        # Several replicas: one STATIC endpoint each (STRICT_DNS for names: one name resolving to
        # every replica works too); each stream goes to one, a broken one reconnects to another.
        cluster = cluster_resource(Service(name=XDS_CLUSTER, endpoints=xds), inline_endpoints=True)
    cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].CopyFrom(
        pack(http2)
    )
    if tls is not None:
        cluster.transport_socket.CopyFrom(_xds_tls_socket(tls))
    return cluster


def _admin(admin: SocketAddress) -> bootstrap_pb2.Admin:
    return bootstrap_pb2.Admin(address=socket_address(admin))


def xds_bootstrap(
    node_id: str,
    xds: XdsTarget,
    admin: SocketAddress,
    api: XdsApi = XdsApi.SOTW,
    transport: XdsTransport = XdsTransport.ADS,
    node_cluster: str | None = None,
    replicas: bool = False,
    tls: XdsTls | None = None,
) -> bootstrap_pb2.Bootstrap:
    """A bootstrap whose listeners and clusters all come from the keepsrc server at `xds`: one
    address, or several replicas of one store. `replicas` (implied by several addresses; set it for
    one DNS name of every replica) adds a short reconnect backoff and HTTP/2 keepalive; so does
    `tls` (mutual TLS to keepsrc: a server beyond one host, where dead peers must be noticed)."""
    target = xds if isinstance(xds, PurePosixPath) else (xds,) if isinstance(xds, SocketAddress) else tuple(xds)
    if not target:
        raise ValueError("no xDS server address")
    replicas = replicas or (isinstance(target, tuple) and len(target) > 1) or tls is not None
    grpc_service = grpc_service_pb2.GrpcService(envoy_grpc={"cluster_name": XDS_CLUSTER})
    if replicas:
        backoff = grpc_service.envoy_grpc.retry_policy.retry_back_off
        backoff.base_interval.FromMilliseconds(RETRY_BASE_MS)
        backoff.max_interval.FromMilliseconds(RETRY_MAX_MS)
    api_source = config_source_pb2.ApiConfigSource(
        api_type=config_source_pb2.ApiConfigSource.DELTA_GRPC if api is XdsApi.DELTA
        else config_source_pb2.ApiConfigSource.GRPC,
        transport_api_version=config_source_pb2.V3,
        grpc_services=[grpc_service],
        set_node_on_first_message_only=True,
    )
    if transport is XdsTransport.ADS:
        source = config_source_pb2.ConfigSource(ads={}, resource_api_version=config_source_pb2.V3)
        dynamic = bootstrap_pb2.Bootstrap.DynamicResources(ads_config=api_source, cds_config=source, lds_config=source)
    else:
        source = config_source_pb2.ConfigSource(api_config_source=api_source, resource_api_version=config_source_pb2.V3)
        dynamic = bootstrap_pb2.Bootstrap.DynamicResources(cds_config=source, lds_config=source)
    return bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(id=node_id, cluster=node_cluster or node_id),
        dynamic_resources=dynamic,
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(clusters=[_xds_cluster(target, replicas, tls)]),
        admin=_admin(admin),
    )


def static_bootstrap(topology: Topology, node: str, admin: SocketAddress) -> bootstrap_pb2.Bootstrap:
    """A complete Envoy config for one proxy, for users who run no control plane."""
    proxy = topology.proxies[node]
    services = dict.fromkeys(name for listener in proxy.listeners for name in listener.services())
    return bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(id=node, cluster=node),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(
            listeners=[
                listener_resource(listener, inline_routes=True, sticky=sticky_services(topology, listener))
                for listener in proxy.listeners
            ],
            clusters=[cluster_resource(topology.services[name], inline_endpoints=True) for name in services],
        ),
        admin=_admin(admin),
    )
