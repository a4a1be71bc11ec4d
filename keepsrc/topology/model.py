"""The typed, immutable topology: what the loader produces and every later stage consumes.

A mesh that embeds keepsrc builds these dataclasses in code and skips the YAML entirely,
so nothing here knows about files or line numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from ipaddress import IPv4Network, IPv6Network
from socket import AF_INET, AF_INET6, inet_pton

IPNetwork = IPv4Network | IPv6Network


def _is_ip(host: str) -> bool:
    # inet_pton is C; ipaddress.ip_address costs ~8 us a call, which shows at 50,000 endpoints.
    for family in (AF_INET, AF_INET6):
        try:
            inet_pton(family, host)
        except OSError:
            continue
        return True
    return False


class Protocol(StrEnum):
    TCP = "tcp"
    HTTP = "http"
    UDP = "udp"


class LbPolicy(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_REQUEST = "least_request"
    RANDOM = "random"
    RING_HASH = "ring_hash"
    MAGLEV = "maglev"


class ProxyProtocolVersion(StrEnum):
    V1 = "v1"
    V2 = "v2"


class TlsVersion(StrEnum):
    """The oldest TLS version a listener or an upstream connection accepts."""

    TLS1_2 = "1.2"
    TLS1_3 = "1.3"


class Sticky(StrEnum):
    CLIENT_IP = "client_ip"  # hash on the original client address: one client, one backend


class PeerMatch(StrEnum):
    """Which address allow_from/deny_from match."""

    CLIENT = "client"  # the client as recovered by PROXY protocol / trusted X-Forwarded-For
    DIRECT_PEER = "direct_peer"  # the TCP peer itself, e.g. the load balancer


class Placement(StrEnum):
    """Where the upstream of an original_src listener lives, which decides the host routing plan."""

    LOCAL = "local"  # the upstream app runs in this network namespace (a sidecar, as in the talk)
    GATEWAY = "gateway"  # the upstream is another host reached through `upstream_interface`


@dataclass(frozen=True)
class SocketAddress:
    host: str  # an IP literal for listeners; an IP or a DNS name for endpoints
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class HealthCheck:
    """A TCP connect health check; on a PROXY-protocol cluster it sends a v2 LOCAL header first."""

    interval_ms: int = 5000
    timeout_ms: int = 1000
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


@dataclass(frozen=True)
class Service:
    name: str
    endpoints: tuple[SocketAddress, ...]
    connect_timeout_ms: int = 1000
    lb: LbPolicy = LbPolicy.ROUND_ROBIN
    send_proxy_protocol: ProxyProtocolVersion | None = None
    health_check: HealthCheck | None = None
    sticky: Sticky | None = None
    tls: UpstreamTls | None = None  # with send_proxy_protocol: the PROXY header first, then the handshake

    @property
    def effective_lb(self) -> LbPolicy:
        """Sticky sessions need a consistent-hash balancer; ring_hash unless maglev was chosen."""
        if self.sticky is not None and self.lb not in (LbPolicy.RING_HASH, LbPolicy.MAGLEV):
            return LbPolicy.RING_HASH
        return self.lb

    @cached_property
    def uses_dns(self) -> bool:
        """Any hostname endpoint makes the cluster STRICT_DNS; all-IP clusters are served by EDS."""
        return any(not _is_ip(ep.host) for ep in self.endpoints)


@dataclass(frozen=True)
class AcceptProxyProtocol:
    versions: tuple[ProxyProtocolVersion, ...] = (ProxyProtocolVersion.V1, ProxyProtocolVersion.V2)
    optional: bool = False  # accept connections that carry no PROXY header at all
    pass_through_tlvs: tuple[int, ...] = ()


@dataclass(frozen=True)
class OriginalSrc:
    mark: int = 1337
    placement: Placement | None = None  # None: netplan refuses to guess and says what to add
    upstream_interface: str | None = None  # required for gateway placement
    table: int = 133  # policy-routing table that sends marked replies to lo


@dataclass(frozen=True)
class Xff:
    use_remote_address: bool = True
    trusted_hops: int = 0
    skip_append: bool = False
    # Peers Envoy counts as internal (x-envoy-internal, no x-envoy-external-address). Envoy 1.40
    # counts no one, loopback and RFC 1918 included, unless told.
    internal_cidrs: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Certificate:
    """A certificate chain and its private key, both PEM files on the Envoy's host.

    Envoy reads them through a file-based SDS secret (keepsrc.snapshots.tls writes it beside the
    certificate), so a certificate renewed on disk is used for new handshakes without a listener
    change. `server_names`: the SNI names this certificate answers; empty for the default one.
    """

    cert: str
    key: str
    server_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class DownstreamTls:
    """TLS termination on an http listener: one filter chain per certificate, chosen by SNI."""

    certificates: tuple[Certificate, ...]
    alpn: tuple[str, ...] = ("h2", "http/1.1")
    min_version: TlsVersion = TlsVersion.TLS1_2


@dataclass(frozen=True)
class UpstreamTls:
    """TLS from Envoy to a service's endpoints, verified against the PEM bundle `ca`."""

    ca: str
    sni: str | None = None  # also the name the upstream's certificate must carry
    client_certificate: Certificate | None = None
    min_version: TlsVersion = TlsVersion.TLS1_2



@dataclass(frozen=True)
class SniRoute:
    """SNI passthrough on a tcp listener: connections whose ClientHello names one of
    `server_names` go to `service`, still encrypted."""

    server_names: tuple[str, ...]
    service: str


@dataclass(frozen=True)
class Route:
    prefix: str
    service: str


@dataclass(frozen=True)
class Listener:
    name: str
    address: SocketAddress
    protocol: Protocol
    service: str | None = None  # tcp only
    routes: tuple[Route, ...] = ()  # http only
    accept_proxy_protocol: AcceptProxyProtocol | None = None
    tls_inspector: bool = False
    original_src: OriginalSrc | None = None
    xff: Xff | None = None  # http only
    allow_from: tuple[IPNetwork, ...] = ()  # tcp/http: only these clients (empty: everyone)
    deny_from: tuple[IPNetwork, ...] = ()  # tcp/http: never these clients; wins over allow_from
    match: PeerMatch = PeerMatch.CLIENT
    access_log: str | None = None  # "stdout", "stderr" or a file path; JSON lines
    stat_prefix: str | None = None  # default: the listener name
    idle_timeout_ms: int | None = None  # tcp: connection idle timeout; udp: session idle timeout
    tls: DownstreamTls | None = None  # http only: terminate TLS here
    sni_routes: tuple[SniRoute, ...] = ()  # tcp only: pass TLS through, by SNI; `service` is the default

    @property
    def stats_name(self) -> str:
        return self.stat_prefix or self.name

    @property
    def inspects_tls(self) -> bool:
        """tls_inspector is on: asked for, or needed to read the SNI that picks a filter chain."""
        by_sni = bool(self.sni_routes) or (self.tls is not None and any(c.server_names for c in self.tls.certificates))
        return self.tls_inspector or by_sni

    @property
    def passes_tls_through(self) -> bool:
        """A tcp listener that routes TLS by SNI without decrypting it."""
        return bool(self.sni_routes)

    def services(self) -> tuple[str, ...]:
        """Upstream services this listener sends to, in first-use order."""
        if self.routes:
            names = [r.service for r in self.routes]
        else:
            names = [r.service for r in self.sni_routes] + ([self.service] if self.service else [])
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Proxy:
    name: str  # matched against the Envoy's node.id, else node.cluster
    listeners: tuple[Listener, ...]
    # SPIFFE IDs, besides spiffe://<trust domain>/keepsrc/<name>, whose certificates may be served
    # this entry (`keepsrc serve --client-ca`): e.g. the one identity a fleet of Envoys shares.
    identities: tuple[str, ...] = ()


@dataclass(frozen=True)
class Topology:
    """Services by name and proxies by name; treat both dicts as read-only once built."""

    services: dict[str, Service] = field(default_factory=dict)
    proxies: dict[str, Proxy] = field(default_factory=dict)
