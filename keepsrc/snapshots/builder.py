"""Topology -> Envoy resources (typed xds-protos messages). Pure functions, no I/O.

Two flavours share one set of builders:
- xDS (`build_snapshots`): clusters of IP endpoints are EDS clusters, HTTP listeners use RDS,
  both through the ADS stream that delivered them.
- static (`keepsrc.snapshots.bootstrap.static_bootstrap`): endpoints and routes inline.
"""

from __future__ import annotations

from functools import lru_cache

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    health_check_pb2,
    proxy_protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_src.v3 import original_src_pb2
from envoy.extensions.filters.listener.proxy_protocol.v3 import proxy_protocol_pb2 as listener_pp_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.proxy_protocol.v3 import upstream_proxy_protocol_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from keepsrc.snapshots import wire
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource, Snapshot
from keepsrc.topology.model import (
    AcceptProxyProtocol,
    HealthCheck,
    LbPolicy,
    Listener,
    Protocol,
    ProxyProtocolVersion,
    Service,
    SocketAddress,
    Topology,
)

# Listener filter names, in the only order that works: the PROXY header is the first bytes on
# the wire (before any TLS ClientHello), and original_src must see the address it recovered.
PROXY_PROTOCOL_FILTER = "envoy.filters.listener.proxy_protocol"
TLS_INSPECTOR_FILTER = "envoy.filters.listener.tls_inspector"
ORIGINAL_SRC_FILTER = "envoy.filters.listener.original_src"

LB_POLICIES = {
    LbPolicy.ROUND_ROBIN: cluster_pb2.Cluster.ROUND_ROBIN,
    LbPolicy.LEAST_REQUEST: cluster_pb2.Cluster.LEAST_REQUEST,
    LbPolicy.RANDOM: cluster_pb2.Cluster.RANDOM,
    LbPolicy.RING_HASH: cluster_pb2.Cluster.RING_HASH,
    LbPolicy.MAGLEV: cluster_pb2.Cluster.MAGLEV,
}
PP_VERSIONS = {
    ProxyProtocolVersion.V1: proxy_protocol_pb2.ProxyProtocolConfig.V1,
    ProxyProtocolVersion.V2: proxy_protocol_pb2.ProxyProtocolConfig.V2,
}

_ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
)


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def _duration(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def socket_address(address: SocketAddress) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=address.host, port_value=address.port))


def route_config_name(listener: Listener) -> str:
    return listener.name


# -- listeners ------------------------------------------------------------------------------
def _proxy_protocol_filter(accept: AcceptProxyProtocol) -> listener_components_pb2.ListenerFilter:
    config = listener_pp_pb2.ProxyProtocol(allow_requests_without_proxy_protocol=accept.optional)
    config.disallowed_versions.extend(
        PP_VERSIONS[v] for v in ProxyProtocolVersion if v not in accept.versions
    )
    if accept.pass_through_tlvs:
        config.pass_through_tlvs.CopyFrom(
            proxy_protocol_pb2.ProxyProtocolPassThroughTLVs(
                match_type=proxy_protocol_pb2.ProxyProtocolPassThroughTLVs.INCLUDE,
                tlv_type=list(accept.pass_through_tlvs),
            )
        )
    return listener_components_pb2.ListenerFilter(name=PROXY_PROTOCOL_FILTER, typed_config=pack(config))


def listener_filters(listener: Listener) -> list[listener_components_pb2.ListenerFilter]:
    filters = []
    if listener.accept_proxy_protocol is not None:
        filters.append(_proxy_protocol_filter(listener.accept_proxy_protocol))
    if listener.tls_inspector:
        filters.append(
            listener_components_pb2.ListenerFilter(
                name=TLS_INSPECTOR_FILTER, typed_config=pack(tls_inspector_pb2.TlsInspector())
            )
        )
    if listener.original_src is not None:
        config = original_src_pb2.OriginalSrc(mark=listener.original_src.mark)
        filters.append(listener_components_pb2.ListenerFilter(name=ORIGINAL_SRC_FILTER, typed_config=pack(config)))
    return filters


def route_configuration(listener: Listener) -> route_pb2.RouteConfiguration:
    routes = [
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix=r.prefix),
            route=route_components_pb2.RouteAction(cluster=r.service),
        )
        for r in listener.routes
    ]
    return route_pb2.RouteConfiguration(
        name=route_config_name(listener),
        virtual_hosts=[route_components_pb2.VirtualHost(name=listener.name, domains=["*"], routes=routes)],
    )


def _http_connection_manager(listener: Listener, inline_routes: bool) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=listener.name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))],
    )
    if inline_routes:
        hcm.route_config.CopyFrom(route_configuration(listener))
    else:
        hcm.rds.CopyFrom(hcm_pb2.Rds(config_source=_ADS, route_config_name=route_config_name(listener)))
    if listener.xff is not None:
        hcm.use_remote_address.CopyFrom(wrappers_pb2.BoolValue(value=listener.xff.use_remote_address))
        hcm.skip_xff_append = listener.xff.skip_append
        hcm.xff_num_trusted_hops = listener.xff.trusted_hops
    return hcm


def listener_resource(listener: Listener, inline_routes: bool = False) -> listener_pb2.Listener:
    if listener.protocol is Protocol.TCP:
        network_filter = listener_components_pb2.Filter(
            name="envoy.filters.network.tcp_proxy",
            typed_config=pack(tcp_proxy_pb2.TcpProxy(stat_prefix=listener.name, cluster=listener.service)),
        )
    else:
        network_filter = listener_components_pb2.Filter(
            name="envoy.filters.network.http_connection_manager",
            typed_config=pack(_http_connection_manager(listener, inline_routes)),
        )
    return listener_pb2.Listener(
        name=listener.name,
        address=socket_address(listener.address),
        listener_filters=listener_filters(listener),
        filter_chains=[listener_components_pb2.FilterChain(filters=[network_filter])],
    )


# -- clusters and endpoints ---------------------------------------------------------------------
def load_assignment(service: Service) -> endpoint_pb2.ClusterLoadAssignment:
    # Nested dicts rather than nested message constructors: upb builds the tree in C, about
    # twice as fast, and this is the hot path at tens of thousands of endpoints.
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=service.name,
        endpoints=[
            {
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": ep.host, "port_value": ep.port}}}}
                    for ep in service.endpoints
                ]
            }
        ],
    )


def _health_check(check: HealthCheck, proxy_protocol: ProxyProtocolVersion | None) -> health_check_pb2.HealthCheck:
    tcp = health_check_pb2.HealthCheck.TcpHealthCheck()
    if proxy_protocol is not None:
        # An upstream that requires a PROXY header closes a bare health-check connection, which
        # would mark every endpoint unhealthy; Envoy sends a v2 LOCAL (or v1 UNKNOWN) header.
        tcp.proxy_protocol_config.CopyFrom(proxy_protocol_pb2.ProxyProtocolConfig(version=PP_VERSIONS[proxy_protocol]))
    return health_check_pb2.HealthCheck(
        timeout=_duration(check.timeout_ms),
        interval=_duration(check.interval_ms),
        unhealthy_threshold=wrappers_pb2.UInt32Value(value=check.unhealthy_threshold),
        healthy_threshold=wrappers_pb2.UInt32Value(value=check.healthy_threshold),
        tcp_health_check=tcp,
    )


def _upstream_proxy_protocol(version: ProxyProtocolVersion) -> base_pb2.TransportSocket:
    inner = base_pb2.TransportSocket(
        name="envoy.transport_sockets.raw_buffer", typed_config=pack(raw_buffer_pb2.RawBuffer())
    )
    config = upstream_proxy_protocol_pb2.ProxyProtocolUpstreamTransport(
        config=proxy_protocol_pb2.ProxyProtocolConfig(version=PP_VERSIONS[version]), transport_socket=inner
    )
    return base_pb2.TransportSocket(name="envoy.transport_sockets.upstream_proxy_protocol", typed_config=pack(config))


def cluster_resource(service: Service, inline_endpoints: bool = False) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=service.name,
        connect_timeout=_duration(service.connect_timeout_ms),
        lb_policy=LB_POLICIES[service.lb],
    )
    if service.uses_dns:
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
        cluster.load_assignment.CopyFrom(load_assignment(service))
    elif inline_endpoints:
        cluster.type = cluster_pb2.Cluster.STATIC
        cluster.load_assignment.CopyFrom(load_assignment(service))
    else:
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(_ADS)
    if service.send_proxy_protocol is not None:
        cluster.transport_socket.CopyFrom(_upstream_proxy_protocol(service.send_proxy_protocol))
    if service.health_check is not None:
        cluster.health_checks.append(_health_check(service.health_check, service.send_proxy_protocol))
    return cluster


# -- snapshots ---------------------------------------------------------------------------------
# Memoized on the frozen model objects: a service used by many proxies is built and serialized
# once per build, and an edit that leaves a service unchanged reuses its Resource (same bytes,
# same version) on the next build too.
@lru_cache(maxsize=65536)
def _cluster(service: Service) -> Resource:
    return Resource.of(service.name, CLUSTER, cluster_resource(service))


@lru_cache(maxsize=65536)
def _endpoints(service: Service) -> Resource:
    body = wire.cluster_load_assignment(service.name, service.endpoints)
    return Resource(service.name, ENDPOINT, body, endpoint_pb2.ClusterLoadAssignment)


@lru_cache(maxsize=65536)
def _listener(listener: Listener) -> Resource:
    return Resource.of(listener.name, LISTENER, listener_resource(listener))


@lru_cache(maxsize=65536)
def _route(listener: Listener) -> Resource:
    return Resource.of(route_config_name(listener), ROUTE, route_configuration(listener))


def build_snapshot(topology: Topology, proxy_name: str) -> Snapshot:
    proxy = topology.proxies[proxy_name]
    resources: list[Resource] = []
    services: dict[str, Service] = {}
    for listener in proxy.listeners:
        resources.append(_listener(listener))
        if listener.protocol is Protocol.HTTP:
            resources.append(_route(listener))
        for name in listener.services():
            services[name] = topology.services[name]
    for service in services.values():
        resources.append(_cluster(service))
        if not service.uses_dns:
            resources.append(_endpoints(service))
    return Snapshot.from_resources(resources)


def build_snapshots(topology: Topology) -> dict[str, Snapshot]:
    """One Snapshot per proxy entry, keyed by the proxy name (an Envoy node.id or node.cluster)."""
    return {name: build_snapshot(topology, name) for name in topology.proxies}
