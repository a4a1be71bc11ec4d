"""Topology -> Envoy resources (typed xds-protos messages). Pure functions, no I/O.

Two flavours share one set of builders:
- xDS (`build_snapshots`): clusters of IP endpoints are EDS clusters, HTTP listeners use RDS,
  both through the ADS stream that delivered them.
- static (`keepsrc.snapshots.bootstrap.static_bootstrap`): endpoints and routes inline.
"""

from __future__ import annotations

from functools import lru_cache

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    health_check_pb2,
    proxy_protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2, udp_listener_config_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_src.v3 import original_src_pb2
from envoy.extensions.filters.listener.proxy_protocol.v3 import proxy_protocol_pb2 as listener_pp_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.filters.udp.udp_proxy.v3 import route_pb2 as udp_route_pb2
from envoy.extensions.filters.udp.udp_proxy.v3 import udp_proxy_pb2
from envoy.extensions.transport_sockets.proxy_protocol.v3 import upstream_proxy_protocol_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.type.v3 import hash_policy_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message
from xds.type.matcher.v3 import matcher_pb2

from keepsrc.snapshots import tls, wire
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource, Snapshot
from keepsrc.topology.model import (
    AcceptProxyProtocol,
    HealthCheck,
    IPNetwork,
    LbPolicy,
    Listener,
    PeerMatch,
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
def _proxy_protocol_filter(accept: AcceptProxyProtocol, stat_prefix: str) -> listener_components_pb2.ListenerFilter:
    config = listener_pp_pb2.ProxyProtocol(
        allow_requests_without_proxy_protocol=accept.optional, stat_prefix=stat_prefix
    )
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
        filters.append(_proxy_protocol_filter(listener.accept_proxy_protocol, listener.stats_name))
    if listener.inspects_tls:
        filters.append(
            listener_components_pb2.ListenerFilter(
                name=TLS_INSPECTOR_FILTER, typed_config=pack(tls_inspector_pb2.TlsInspector())
            )
        )
    if listener.original_src is not None:
        config = original_src_pb2.OriginalSrc(mark=listener.original_src.mark)
        filters.append(listener_components_pb2.ListenerFilter(name=ORIGINAL_SRC_FILTER, typed_config=pack(config)))
    return filters


# Access logs: one JSON line per connection (tcp) or request (http). Both addresses are logged,
# so a reader sees the client Envoy recovered next to the peer that actually connected.
ACCESS_LOG_FIELDS = {
    "time": "%START_TIME%",
    "listener": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "direct_peer": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_local": "%UPSTREAM_LOCAL_ADDRESS%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "termination": "%CONNECTION_TERMINATION_DETAILS%",
}


def access_logs(listener: Listener) -> list[accesslog_pb2.AccessLog]:
    if listener.access_log is None:
        return []
    fields = struct_pb2.Struct()
    fields.update({"stat_prefix": listener.stats_name, **ACCESS_LOG_FIELDS})
    log_format = substitution_format_string_pb2.SubstitutionFormatString(json_format=fields)
    config: Message
    if listener.access_log == "stdout":
        name, config = "envoy.access_loggers.stdout", stream_pb2.StdoutAccessLog(log_format=log_format)
    elif listener.access_log == "stderr":
        name, config = "envoy.access_loggers.stderr", stream_pb2.StderrAccessLog(log_format=log_format)
    else:
        name, config = "envoy.access_loggers.file", file_pb2.FileAccessLog(path=listener.access_log,
                                                                           log_format=log_format)
    return [accesslog_pb2.AccessLog(name=name, typed_config=pack(config))]


def _cidr(network: IPNetwork) -> address_pb2.CidrRange:
    return address_pb2.CidrRange(
        address_prefix=str(network.network_address), prefix_len=wrappers_pb2.UInt32Value(value=network.prefixlen)
    )


def _peer_in(networks: tuple[IPNetwork, ...], match: PeerMatch) -> rbac_pb2.Principal:
    field = "remote_ip" if match is PeerMatch.CLIENT else "direct_remote_ip"
    return rbac_pb2.Principal(
        or_ids=rbac_pb2.Principal.Set(ids=[rbac_pb2.Principal(**{field: _cidr(n)}) for n in networks])
    )


def access_rules(listener: Listener) -> rbac_pb2.RBAC | None:
    """One ALLOW policy: in allow_from (or anyone, when it is empty) and not in deny_from.

    A single policy rather than a DENY filter followed by an ALLOW filter keeps one decision per
    connection, so the rbac.allowed/denied stats count clients, and deny_from wins on overlap.
    `remote_ip` is the address Envoy recovered (PROXY protocol, trusted X-Forwarded-For);
    `direct_remote_ip` is the TCP peer, only when the topology asks for it.
    """
    if not listener.allow_from and not listener.deny_from:
        return None
    conditions = []
    if listener.allow_from:
        conditions.append(_peer_in(listener.allow_from, listener.match))
    if listener.deny_from:
        conditions.append(rbac_pb2.Principal(not_id=_peer_in(listener.deny_from, listener.match)))
    principal = conditions[0] if len(conditions) == 1 else rbac_pb2.Principal(
        and_ids=rbac_pb2.Principal.Set(ids=conditions)
    )
    policy = rbac_pb2.Policy(permissions=[rbac_pb2.Permission(any=True)], principals=[principal])
    rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW)
    rules.policies["allow_from-deny_from"].CopyFrom(policy)
    return rules


# Hash on the client for HTTP: Envoy's connection source_ip is the TCP peer (or the PROXY-protocol
# client), never the X-Forwarded-For client, so a client behind a trusted proxy would hash as
# that proxy. x-envoy-external-address carries exactly the trusted client (Envoy sets it, and
# strips any forged copy, on external requests with use_remote_address); `terminal` makes it win
# when present, and the connection's source is the fallback.
CLIENT_HASH_POLICY = (
    route_components_pb2.RouteAction.HashPolicy(
        header=route_components_pb2.RouteAction.HashPolicy.Header(header_name="x-envoy-external-address"),
        terminal=True,
    ),
    route_components_pb2.RouteAction.HashPolicy(
        connection_properties=route_components_pb2.RouteAction.HashPolicy.ConnectionProperties(source_ip=True)
    ),
)


def route_configuration(listener: Listener, sticky: frozenset[str] = frozenset()) -> route_pb2.RouteConfiguration:
    """`sticky` names the services whose routes hash on the client address."""
    routes = []
    for r in listener.routes:
        action = route_components_pb2.RouteAction(cluster=r.service)
        if r.service in sticky:
            action.hash_policy.extend(CLIENT_HASH_POLICY)
        routes.append(route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix=r.prefix), route=action))
    return route_pb2.RouteConfiguration(
        name=route_config_name(listener),
        virtual_hosts=[route_components_pb2.VirtualHost(name=listener.name, domains=["*"], routes=routes)],
    )


def _http_connection_manager(
    listener: Listener, inline_routes: bool, sticky: frozenset[str]
) -> hcm_pb2.HttpConnectionManager:
    http_filters = []
    rules = access_rules(listener)
    if rules is not None:
        http_filters.append(hcm_pb2.HttpFilter(name="envoy.filters.http.rbac",
                                               typed_config=pack(http_rbac_pb2.RBAC(rules=rules))))
    http_filters.append(hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())))
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=listener.stats_name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        http_filters=http_filters,
        access_log=access_logs(listener),
    )
    if inline_routes:
        hcm.route_config.CopyFrom(route_configuration(listener, sticky))
    else:
        hcm.rds.CopyFrom(hcm_pb2.Rds(config_source=_ADS, route_config_name=route_config_name(listener)))
    if listener.xff is not None:
        hcm.use_remote_address.CopyFrom(wrappers_pb2.BoolValue(value=listener.xff.use_remote_address))
        hcm.skip_xff_append = listener.xff.skip_append
        hcm.xff_num_trusted_hops = listener.xff.trusted_hops
        if listener.xff.internal_cidrs:
            hcm.internal_address_config.cidr_ranges.extend(_cidr(n) for n in listener.xff.internal_cidrs)
    return hcm


def _tcp_filters(listener: Listener, service: str, sticky: frozenset[str]) -> list[listener_components_pb2.Filter]:
    tcp_proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=listener.stats_name, cluster=service,
                                       access_log=access_logs(listener))
    if service in sticky:
        tcp_proxy.hash_policy.append(hash_policy_pb2.HashPolicy(source_ip=hash_policy_pb2.HashPolicy.SourceIp()))
    if listener.idle_timeout_ms is not None:
        tcp_proxy.idle_timeout.CopyFrom(_duration(listener.idle_timeout_ms))
    filters = []
    rules = access_rules(listener)
    if rules is not None:
        # The RBAC network filter decides on the first bytes, while tcp_proxy would dial the
        # upstream as soon as the connection is accepted; waiting for data keeps a denied
        # client from ever reaching the backend (see docs/topology.md for server-first protocols).
        tcp_proxy.upstream_connect_mode = tcp_proxy_pb2.ON_DOWNSTREAM_DATA
        tcp_proxy.max_early_data_bytes.value = 65536  # what Envoy buffers from the client meanwhile
        rbac = network_rbac_pb2.RBAC(stat_prefix=f"{listener.stats_name}.", rules=rules)
        filters.append(listener_components_pb2.Filter(name="envoy.filters.network.rbac", typed_config=pack(rbac)))
    filters.append(listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy", typed_config=pack(tcp_proxy)))
    return filters


def _udp_proxy(listener: Listener, sticky: frozenset[str]) -> listener_components_pb2.ListenerFilter:
    route = udp_route_pb2.Route(cluster=listener.service)
    on_no_match = matcher_pb2.Matcher.OnMatch(
        action={"name": "route", "typed_config": pack(route)}
    )
    config = udp_proxy_pb2.UdpProxyConfig(
        stat_prefix=listener.stats_name,
        matcher=matcher_pb2.Matcher(on_no_match=on_no_match),
        use_original_src_ip=listener.original_src is not None,
        access_log=access_logs(listener),
    )
    if listener.service in sticky:
        config.hash_policies.append(udp_proxy_pb2.UdpProxyConfig.HashPolicy(source_ip=True))
    if listener.idle_timeout_ms is not None:
        config.idle_timeout.CopyFrom(_duration(listener.idle_timeout_ms))
    return listener_components_pb2.ListenerFilter(
        name="envoy.filters.udp_listener.udp_proxy", typed_config=pack(config)
    )


def _filter_chains(
    listener: Listener, inline_routes: bool, sticky: frozenset[str]
) -> list[listener_components_pb2.FilterChain]:
    """One chain, or one per SNI choice: a terminating listener's certificates (each chain its own
    TLS context, the same HTTP filters), or a passthrough listener's SNI routes (each its own
    tcp_proxy). A chain without server_names takes the clients whose SNI names none of the others."""
    chain = listener_components_pb2.FilterChain
    if listener.protocol is Protocol.TCP:
        chains = [
            chain(name=",".join(route.server_names),
                  filter_chain_match=listener_components_pb2.FilterChainMatch(server_names=route.server_names),
                  filters=_tcp_filters(listener, route.service, sticky))
            for route in listener.sni_routes
        ]
        if listener.service is not None:
            filters = _tcp_filters(listener, listener.service, sticky)
            chains.append(chain(name="default", filters=filters) if chains else chain(filters=filters))
        return chains
    hcm = listener_components_pb2.Filter(
        name="envoy.filters.network.http_connection_manager",
        typed_config=pack(_http_connection_manager(listener, inline_routes, sticky)),
    )
    if listener.tls is None:
        return [chain(filters=[hcm])]
    return [
        chain(
            name=",".join(certificate.server_names) or "default",
            filter_chain_match=listener_components_pb2.FilterChainMatch(server_names=certificate.server_names),
            filters=[hcm],
            transport_socket=base_pb2.TransportSocket(
                name=tls.TLS_TRANSPORT_SOCKET, typed_config=pack(tls.downstream_context(listener.tls, certificate))
            ),
        )
        for certificate in listener.tls.certificates
    ]


def listener_resource(
    listener: Listener, inline_routes: bool = False, sticky: frozenset[str] = frozenset()
) -> listener_pb2.Listener:
    """`sticky`: the names of this listener's upstream services that hash on the client address."""
    if listener.protocol is Protocol.UDP:
        address = socket_address(listener.address)
        address.socket_address.protocol = address_pb2.SocketAddress.UDP
        return listener_pb2.Listener(
            name=listener.name,
            address=address,
            udp_listener_config=udp_listener_config_pb2.UdpListenerConfig(),
            listener_filters=[_udp_proxy(listener, sticky)],
        )
    return listener_pb2.Listener(
        name=listener.name,
        address=socket_address(listener.address),
        listener_filters=listener_filters(listener),
        filter_chains=_filter_chains(listener, inline_routes, sticky),
        # Connections refused before a filter chain runs (a missing PROXY header) are logged here.
        access_log=access_logs(listener),
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
        # Envoy checks a cluster that has carried no traffic yet every 60 s, whatever the interval:
        # an endpoint that failed the first check (its Envoy or host plan not up yet) stayed out
        # for a minute, and with it the whole path of a freshly started mesh.
        no_traffic_interval=_duration(check.interval_ms),
        unhealthy_threshold=wrappers_pb2.UInt32Value(value=check.unhealthy_threshold),
        healthy_threshold=wrappers_pb2.UInt32Value(value=check.healthy_threshold),
        tcp_health_check=tcp,
    )


def _upstream_transport(service: Service) -> base_pb2.TransportSocket | None:
    """TLS, PROXY protocol, or both: then the PROXY header wraps TLS, so it goes out first, in the
    clear, and the handshake follows (what HAProxy `accept-proxy ssl` and nginx `ssl proxy_protocol` read)."""
    if service.tls is not None:
        context = tls.upstream_context(service.tls)
        inner = base_pb2.TransportSocket(name=tls.TLS_TRANSPORT_SOCKET, typed_config=pack(context))
    elif service.send_proxy_protocol is not None:
        inner = base_pb2.TransportSocket(
            name="envoy.transport_sockets.raw_buffer", typed_config=pack(raw_buffer_pb2.RawBuffer())
        )
    else:
        return None
    if service.send_proxy_protocol is None:
        return inner
    return _upstream_proxy_protocol(service.send_proxy_protocol, inner)


def _upstream_proxy_protocol(
    version: ProxyProtocolVersion, inner: base_pb2.TransportSocket
) -> base_pb2.TransportSocket:
    config = upstream_proxy_protocol_pb2.ProxyProtocolUpstreamTransport(
        config=proxy_protocol_pb2.ProxyProtocolConfig(version=PP_VERSIONS[version]), transport_socket=inner
    )
    return base_pb2.TransportSocket(name="envoy.transport_sockets.upstream_proxy_protocol", typed_config=pack(config))


def cluster_resource(service: Service, inline_endpoints: bool = False) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=service.name,
        connect_timeout=_duration(service.connect_timeout_ms),
        lb_policy=LB_POLICIES[service.effective_lb],
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
    transport = _upstream_transport(service)
    if transport is not None:
        cluster.transport_socket.CopyFrom(transport)
    if service.health_check is not None:
        cluster.health_checks.append(_health_check(service.health_check, service.send_proxy_protocol))
    return cluster


# -- snapshots ---------------------------------------------------------------------------------
# Memoized on the frozen model objects: a service used by many proxies is built and serialized
# once per build, and an edit that leaves a service unchanged reuses its Resource (same bytes,
# same version) on the next build too.
@lru_cache(maxsize=65536)
def _cluster(service: Service) -> Resource:
    references = frozenset() if service.uses_dns else frozenset({(ENDPOINT, service.name)})
    return Resource.of(service.name, CLUSTER, cluster_resource(service), references)


@lru_cache(maxsize=65536)
def _endpoints(service: Service) -> Resource:
    body = wire.cluster_load_assignment(service.name, service.endpoints)
    return Resource(service.name, ENDPOINT, body, endpoint_pb2.ClusterLoadAssignment, references=frozenset())


@lru_cache(maxsize=65536)
def _listener(listener: Listener, sticky: frozenset[str]) -> Resource:
    if listener.protocol is Protocol.HTTP:
        references = frozenset({(ROUTE, route_config_name(listener))})
    else:
        references = frozenset((CLUSTER, name) for name in listener.services())
    return Resource.of(listener.name, LISTENER, listener_resource(listener, sticky=sticky), references)


@lru_cache(maxsize=65536)
def _route(listener: Listener, sticky: frozenset[str]) -> Resource:
    return Resource.of(route_config_name(listener), ROUTE, route_configuration(listener, sticky),
                       frozenset((CLUSTER, name) for name in listener.services()))


def sticky_services(topology: Topology, listener: Listener) -> frozenset[str]:
    return frozenset(n for n in listener.services() if topology.services[n].sticky is not None)


def build_snapshot(topology: Topology, proxy_name: str) -> Snapshot:
    proxy = topology.proxies[proxy_name]
    resources: list[Resource] = []
    services: dict[str, Service] = {}
    for listener in proxy.listeners:
        sticky = sticky_services(topology, listener)
        resources.append(_listener(listener, sticky))
        if listener.protocol is Protocol.HTTP:
            resources.append(_route(listener, sticky))
        for name in listener.services():
            services[name] = topology.services[name]
    for service in services.values():
        resources.append(_cluster(service))
        if not service.uses_dns:
            resources.append(_endpoints(service))
    return Snapshot.from_resources(resources, proxy.identities)


def build_snapshots(topology: Topology) -> dict[str, Snapshot]:
    """One Snapshot per proxy entry, keyed by the proxy name (an Envoy node.id or node.cluster)."""
    return {name: build_snapshot(topology, name) for name in topology.proxies}
