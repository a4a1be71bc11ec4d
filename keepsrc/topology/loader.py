"""Topology YAML -> Topology, validating every key against schema v1 (documented in docs/topology.md).

One schema, two passes over the text. The plain pass (plain.py) reads it into plain values with
yaml-rs and walks them with no positions: a valid file is loaded that way, about twice as fast.
At the first finding, or any value it cannot be sure of, the precise pass takes over: the file
composed into PyYAML nodes (reader.py), so that every finding names the line and column of the
offending key or value. All findings of one file are collected in that single pass, in time
linear in the file; a file with any error yields no Topology. Every value accepted here is one
Envoy 1.40 accepts: the bounds are Envoy's own (durations, ports, path lengths) or tighter. The
TLS sections are in tls_schema.py.
"""

from __future__ import annotations

import gc
import ipaddress
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from yaml.nodes import Node

from keepsrc.topology.checker import (
    DNS_LABEL,
    Keys,
    Parsers,
    Suggestions,
    file_path_problem,
    listing,
    quoted,
    suggest,
)
from keepsrc.topology.diagnostics import Diagnostic, Severity, TopologyError
from keepsrc.topology.model import (
    AcceptProxyProtocol,
    HealthCheck,
    IPNetwork,
    LbPolicy,
    Listener,
    OriginalSrc,
    PeerMatch,
    Placement,
    Protocol,
    Proxy,
    ProxyProtocolVersion,
    Route,
    Service,
    SniRoute,
    SocketAddress,
    Sticky,
    Topology,
    Xff,
)
from keepsrc.topology.plain import NeedsPositions, PlainChecker, read_plain
from keepsrc.topology.reader import API_VERSION, compose, max_bytes_limit, too_large, utf8_size
from keepsrc.topology.tls_schema import TlsSchema

__all__ = ["check_topology", "check_topology_bytes", "check_topology_text", "cycle_collection_paused", "load_topology"]

# A DNS name: at most 253 characters, labels of at most 63 (RFC 1035); the resolver refuses longer.
HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){DNS_LABEL}(\.{DNS_LABEL})*\.?")
BRACKETED_ADDRESS_RE = re.compile(r"\[([^\]]*)\]:([0-9]+)")
ADDRESS_RE = re.compile(r"([^:\[\]]+):([0-9]+)")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_RE = re.compile(rf"{_OCTET}(\.{_OCTET}){{3}}")  # dotted quad in canonical form: no leading zeros
# The common endpoint, a canonical ip:port with a port of 1-65535's digits, in one match; anything
# else takes the general path, which says what is wrong. 50,000 endpoints make this count.
IPV4_PORT_RE = re.compile(rf"(?P<host>{_OCTET}(\.{_OCTET}){{3}}):(?P<port>[1-9][0-9]{{0,4}})")
# A list of them, one a line, ports 1-65535 by their digits: a service's endpoints checked in one match.
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
_ENDPOINT = rf"{_OCTET}(?:\.{_OCTET}){{3}}:{_PORT}"
IPV4_PORTS_RE = re.compile(rf"{_ENDPOINT}(?:\n{_ENDPOINT})*")
# The SPIFFE ID grammar (spiffe.io, SPIFFE-ID.md): a lowercase trust domain and a non-empty path.
SPIFFE_ID_RE = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+")
INTERFACE_RE = re.compile(r"[A-Za-z0-9_.@-]{1,15}")  # IFNAMSIZ is 16 including the NUL
# Tables the kernel reserves (unspec, default, main, local): routing marked replies there breaks the host.
RESERVED_TABLES = {0, 253, 254, 255}
TABLE_RULE = "1 to 252 or 256 to 2147483647 (0 and 253-255 are the kernel's own tables)"
# A request path is printable ASCII (RFC 3986; anything else is %-encoded); at most this long, which
# Envoy's default request-header limit (60 KiB) lets through.
PREFIX_RE = re.compile(r"/[!-~]*")
PREFIX_MAX = 4096
LISTENER_KEYS = [
    "name", "address", "protocol", "service", "routes", "accept_proxy_protocol", "tls_inspector",
    "original_src", "xff", "allow_from", "deny_from", "match", "access_log", "stat_prefix", "idle_timeout",
    "tls", "sni_routes",
]
_TCP_HTTP = frozenset({Protocol.TCP, Protocol.HTTP})
_TCP_UDP = frozenset({Protocol.TCP, Protocol.UDP})
_RBAC = "keepsrc enforces it with an RBAC filter, which a udp listener has no place for"
# Listener keys that only some protocols use -> (those protocols, what to do instead). The builder
# would ignore such a key on any other protocol, so setting it there is a mistake.
PROTOCOL_KEYS: dict[str, tuple[frozenset[Protocol], str]] = {
    "service": (_TCP_UDP, "an http listener uses 'routes: [{{prefix: /, service: ...}}]'"),
    "routes": (frozenset({Protocol.HTTP}), "a {protocol} listener uses 'service: <name>'"),
    "xff": (frozenset({Protocol.HTTP}), "X-Forwarded-For is an HTTP header; remove it, or use 'protocol: http'"),
    "accept_proxy_protocol": (_TCP_HTTP, "a PROXY protocol header only precedes a TCP stream"),
    "tls_inspector": (_TCP_HTTP, "it reads a TLS ClientHello from a TCP stream"),
    "allow_from": (_TCP_HTTP, _RBAC),
    "deny_from": (_TCP_HTTP, _RBAC),
    "match": (_TCP_HTTP, _RBAC),
    "idle_timeout": (_TCP_UDP, "an http listener's connections follow Envoy's HTTP timeouts"),
    "tls": (frozenset({Protocol.HTTP}), "to pass TLS through by SNI without decrypting it use 'sni_routes'"),
    "sni_routes": (frozenset({Protocol.TCP}), "an http listener terminates TLS with 'tls' and routes by 'routes'"),
}

# The valid values of each enumeration, listed once: a topology names them thousands of times.
PROTOCOLS = [p.value for p in Protocol]
LB_POLICIES = [p.value for p in LbPolicy]
PROXY_PROTOCOL_VERSIONS = [v.value for v in ProxyProtocolVersion]
STICKY_KEYS = [s.value for s in Sticky]
PLACEMENTS = [p.value for p in Placement]
PEER_MATCHES = [m.value for m in PeerMatch]
WHITESPACE_RE = re.compile(r"\s")
SERVICE_KEYS = ["endpoints", "connect_timeout", "lb", "send_proxy_protocol", "health_check", "sticky", "tls"]
SERVICE_REQUIRED = {"endpoints": "a list of ip:port or hostname:port"}
LISTENER_REQUIRED = {
    "name": "a name unique within the proxy",
    "address": "the ip:port to listen on",
    "protocol": "tcp, http or udp",
}
ROUTE_KEYS = ["prefix", "service"]
ROUTE_REQUIRED = {"prefix": "the path prefix to match, e.g. /", "service": "the upstream service name"}
# What each listener of a proxy has taken (a name, an address) -> (its key path, its node).
Claims = dict[object, tuple[str, Node]]


class _Schema(TlsSchema):
    """Schema v1 on top of the generic checks: builds model objects while it reports."""

    def __init__(self, file: str, **checker: Any) -> None:
        super().__init__(file, **checker)
        # Every defined service name, valid definition or not, so a broken service is not also "unknown".
        self.service_names: dict[str, None] = {}
        self.service_suggestions = Suggestions(())
        self.services: dict[str, Service] = {}
        # The parsers of the sections a topology repeats thousands of times, bound once per file.
        self.service_parsers: Parsers = {
            "endpoints": ("endpoints", self.endpoints),
            "connect_timeout": ("connect_timeout_ms", self.duration_ms),
            "lb": ("lb", self.lb),
            "send_proxy_protocol": ("send_proxy_protocol", self.proxy_protocol_version),
            "health_check": ("health_check", self.health_check),
            "sticky": ("sticky", self.sticky),
            "tls": ("tls", self.upstream_tls),
        }
        self.listener_parsers: Parsers = {
            "service": ("service", self.service_ref),
            "routes": ("routes", self.routes),
            "accept_proxy_protocol": ("accept_proxy_protocol", self.accept_proxy_protocol),
            "tls_inspector": ("tls_inspector", self.boolean),
            "original_src": ("original_src", self.original_src),
            "xff": ("xff", self.xff),
            "allow_from": ("allow_from", self.networks),
            "deny_from": ("deny_from", self.networks),
            "match": ("match", self.peer_match),
            "access_log": ("access_log", self.access_log),
            "stat_prefix": ("stat_prefix", self.name),
            "idle_timeout": ("idle_timeout_ms", self.duration_ms),
            "tls": ("tls", self.downstream_tls),
            "sni_routes": ("sni_routes", self.sni_routes),
        }
        self.route_parsers: Parsers = {"prefix": ("prefix", self.prefix), "service": ("service", self.service_ref)}
        self.health_check_parsers: Parsers = {
            "interval": ("interval_ms", self.duration_ms),
            "timeout": ("timeout_ms", self.duration_ms),
            "unhealthy_threshold": ("unhealthy_threshold", self.threshold),
            "healthy_threshold": ("healthy_threshold", self.threshold),
        }
        self.proxy_protocol_parsers: Parsers = {
            "versions": ("versions", self.versions),
            "optional": ("optional", self.boolean),
            "pass_through_tlvs": ("pass_through_tlvs", self.tlvs),
        }
        self.original_src_parsers: Parsers = {
            "mark": ("mark", self.mark),
            "placement": ("placement", self.placement),
            "upstream_interface": ("upstream_interface", self.interface),
            "table": ("table", self.table),
        }
        self.xff_parsers: Parsers = {
            "internal_cidrs": ("internal_cidrs", self.networks),
            "use_remote_address": ("use_remote_address", self.boolean),
            "trusted_hops": ("trusted_hops", self.trusted_hops),
            "skip_append": ("skip_append", self.boolean),
        }

    def topology(self, root: Node) -> Topology:
        required = {
            "apiVersion": f"the schema version, 'apiVersion: {API_VERSION}'",
            "proxies": "a mapping of proxy name (Envoy node.id) -> listeners",
        }
        keys = self.mapping(root, "", ["apiVersion", "services", "proxies"], required) or {}
        if "apiVersion" in keys:
            node = keys["apiVersion"][1]
            version = self.scalar(node, "apiVersion", str, f"'{API_VERSION}'")
            if version is not None and version != API_VERSION:
                self.report(node, "apiVersion", f"unsupported apiVersion {quoted(version)}; valid: {API_VERSION}")
        if "services" in keys:
            defined = self.named_mapping(keys["services"][1], "services", "service name -> settings")
            self.service_names = dict.fromkeys(name for name, _ in defined)
            self.service_suggestions = Suggestions(self.service_names)
            for name, value in defined:
                service = self.service(name, value, f"services.{name}")
                if service is not None:
                    self.services[name] = service
        proxies: dict[str, Proxy] = {}
        if "proxies" in keys:
            for name, value in self.named_mapping(keys["proxies"][1], "proxies", "proxy name -> listeners"):
                proxies[name] = self.proxy(name, value, f"proxies.{name}")
        return Topology(services=self.services, proxies=proxies)

    # -- services ----------------------------------------------------------------------------
    def service(self, name: str, node: Node, path: str) -> Service | None:
        errors_before = self.errors
        keys = self.mapping(node, path, SERVICE_KEYS, SERVICE_REQUIRED)
        if keys is None:
            return None
        values = self.fields(keys, path, self.service_parsers)
        lb = values.get("lb")  # None when lb is absent (then ring_hash) or already reported
        if values.get("sticky") is not None and lb is not None and lb not in (LbPolicy.RING_HASH, LbPolicy.MAGLEV):
            self.report(
                keys["lb"][1], f"{path}.lb",
                f"lb '{lb}' cannot keep a client on one endpoint; with sticky use ring_hash or maglev, or leave"
                " lb out (ring_hash)",
            )
        # Counting errors rather than testing values for None: `health_check: false` is a valid None.
        if self.errors > errors_before:
            return None
        return Service(name=name, **values)

    def lb(self, node: Node, path: str) -> LbPolicy | None:
        return self.choice(node, path, LbPolicy, LB_POLICIES)

    def proxy_protocol_version(self, node: Node, path: str) -> ProxyProtocolVersion | None:
        return self.choice(node, path, ProxyProtocolVersion, PROXY_PROTOCOL_VERSIONS)

    def sticky(self, node: Node, path: str) -> Sticky | None:
        return self.choice(node, path, Sticky, STICKY_KEYS)

    def endpoints(self, node: Node, path: str) -> tuple[SocketAddress, ...]:
        items = self.sequence(node, path, "a list of ip:port or hostname:port")
        if items == []:
            self.report(node, path, "a service needs at least one endpoint (ip:port or hostname:port)")
        joined = self.joined_texts(items) if items else None
        common = _common_endpoints(joined, len(items)) if joined is not None and items else None
        if common is not None:
            return common
        endpoints: list[SocketAddress] = []
        seen: set[tuple[str, int]] = set()
        for i, item in enumerate(items or []):
            address = self.socket_address(item, f"{path}[{i}]", allow_hostname=True)
            if address is None:
                continue
            key = (address.host, address.port)
            if key in seen:
                self.report(item, f"{path}[{i}]", f"duplicate endpoint '{address}'; list each endpoint once")
            else:
                seen.add(key)
                endpoints.append(address)
        return tuple(endpoints)

    def health_check(self, node: Node, path: str) -> HealthCheck | None:
        allowed = ["interval", "timeout", "unhealthy_threshold", "healthy_threshold"]
        if not self.is_mapping(node):
            return HealthCheck() if self.switch(node, path, allowed) else None
        values = self.fields(self.keys(node, path, allowed), path, self.health_check_parsers)
        return None if None in values.values() else HealthCheck(**values)

    def threshold(self, node: Node, path: str) -> int | None:
        return self.integer(node, path, 1, 100)

    def socket_address(self, node: Node, path: str, allow_hostname: bool) -> SocketAddress | None:
        forms = "ip:port or [ipv6]:port" + (" or hostname:port" if allow_hostname else "")
        text = self.scalar(node, path, str, f"an address ({forms})")
        if text is None:
            return None
        common = IPV4_PORT_RE.fullmatch(text)
        if common is not None and int(common["port"]) <= 65535:
            return SocketAddress(common["host"], int(common["port"]))
        match = BRACKETED_ADDRESS_RE.fullmatch(text) or ADDRESS_RE.fullmatch(text)
        if not match:
            self.report(node, path, f"{_address_problem(text)}; valid: {forms}")
            return None
        host, port = match.group(1), int(match.group(2))
        if not 1 <= port <= 65535:
            self.report(node, path, f"port {port} in {quoted(text)} is out of range; valid: 1 to 65535")
            return None
        if IPV4_RE.fullmatch(host):  # already canonical; ipaddress costs ~8 us, which shows at 50,000 endpoints
            return SocketAddress(host, port) if not text.startswith("[") else self.bracketed_ipv4(node, path, text)
        try:
            # A scope (fe80::1%eth0) is an IPv6 address to Python, and malformed to Envoy.
            ip = ipaddress.ip_address(host) if "%" not in host else None
        except ValueError:
            ip = None
        if ip is None:
            if not allow_hostname:
                self.report(
                    node, path,
                    f"{quoted(host)} is not an IP address; a listener binds an IP, e.g. 0.0.0.0:{port} (every"
                    f" IPv4 address), 127.0.0.1:{port} or [::]:{port}",
                )
                return None
            if text.startswith("[") or not HOSTNAME_RE.fullmatch(host):
                self.report(
                    node, path,
                    f"{quoted(host)} is neither an IP address nor a hostname (labels of 1-63 letters, digits"
                    f" and '-', 253 characters in all); valid: {forms}",
                )
                return None
            return SocketAddress(host, port)
        if text.startswith("[") != (ip.version == 6):
            self.report(node, path, f"{quoted(text)}: only IPv6 addresses go in brackets; valid: {ip}:{port}")
            return None
        # Canonical text, so that [::1]:80 and [0:0::1]:80 are recognised as one address.
        return SocketAddress(str(ip), port)

    def bracketed_ipv4(self, node: Node, path: str, text: str) -> None:
        host, _, port = text[1:].partition("]:")
        self.report(node, path, f"{quoted(text)}: only IPv6 addresses go in brackets; valid: {host}:{port}")

    # -- proxies and listeners ---------------------------------------------------------------
    def proxy(self, name: str, node: Node, path: str) -> Proxy:
        keys = self.mapping(node, path, ["listeners", "identities"], {"listeners": "a list of listeners"}) or {}
        identities: list[str] = []
        if "identities" in keys:
            items = self.sequence(keys["identities"][1], f"{path}.identities", "a list of SPIFFE IDs") or []
            for i, item in enumerate(items):
                identity = self.spiffe_id(item, f"{path}.identities[{i}]")
                if identity is not None:
                    identities.append(identity)
        listeners: list[Listener] = []
        # Envoy refuses a second listener with a name or an address already taken on the same node.
        names: Claims = {}
        addresses: Claims = {}
        if "listeners" in keys:
            items = self.sequence(keys["listeners"][1], f"{path}.listeners", "a list of listeners") or []
            for i, item in enumerate(items):
                listener = self.listener(item, f"{path}.listeners[{i}]", name, names, addresses)
                if listener is not None:
                    listeners.append(listener)
        return Proxy(name=name, listeners=tuple(listeners), identities=tuple(dict.fromkeys(identities)))

    def spiffe_id(self, node: Node, path: str) -> str | None:
        text = self.scalar(node, path, str, "a SPIFFE ID (spiffe://trust-domain/path)")
        if text is None:
            return None
        if not SPIFFE_ID_RE.fullmatch(text) or len(text) > 2048:
            self.report(node, path, f"{quoted(text)} is not a SPIFFE ID; valid: spiffe://TRUST-DOMAIN/PATH, e.g. "
                        "spiffe://example.org/keepsrc/edge-fleet (lowercase trust domain, a path of "
                        "letters, digits and . - _ segments)")
            return None
        return text

    def claim(self, taken: Claims, value: object, node: Node, path: str, problem: Callable[[], str]) -> None:
        """Records that the listener at `path` uses `value`; reports it if an earlier listener does.
        `problem` words the finding, only when there is one (thousands of listeners have none)."""
        if value not in taken:
            taken[value] = (path, node)
            return
        first_path, first_node = taken[value]
        first = f"{first_path.rpartition('.')[0].rpartition('.')[2]} (line {self.line(first_node)})"
        key = path.rpartition(".")[2]
        self.report(node, path, f"{problem()}: {first} has it; each listener needs its own {key}")

    def listener(
        self, node: Node, path: str, proxy: str, names: Claims, addresses: Claims
    ) -> Listener | None:
        errors_before = self.errors
        keys = self.mapping(node, path, LISTENER_KEYS, LISTENER_REQUIRED)
        if keys is None:
            return None
        values: dict[str, Any] = {}
        protocol = None
        if "protocol" in keys:
            protocol = self.choice(keys["protocol"][1], f"{path}.protocol", Protocol, PROTOCOLS)
            values["protocol"] = protocol
        if "name" in keys:
            values["name"] = self.name(keys["name"][1], f"{path}.name")
            if values["name"] is not None:
                name = values["name"]
                self.claim(names, name, keys["name"][1], f"{path}.name",
                           lambda: f"duplicate listener name '{name}' on proxy '{proxy}'")
        if "address" in keys:
            address = keys["address"][1]
            values["address"] = self.socket_address(address, f"{path}.address", allow_hostname=False)
            if values["address"] is not None:
                at = values["address"]
                # A udp and a tcp socket may share an ip:port; two of one kind may not.
                self.claim(addresses, (protocol is Protocol.UDP, at), address, f"{path}.address",
                           lambda: f"duplicate address {at} on proxy '{proxy}'")
        misplaced = self.misplaced(keys, path, protocol)
        placed = {key: keys[key] for key in keys if key not in misplaced} if misplaced else keys
        values.update(self.fields(placed, path, self.listener_parsers))
        if protocol is Protocol.HTTP and "routes" not in keys:
            self.missing(node, f"{path}.routes", "an http listener needs 'routes': a list of {prefix, service}")
        elif protocol in (Protocol.TCP, Protocol.UDP) and "service" not in keys and not (
            protocol is Protocol.TCP and "sni_routes" in keys  # then `service` is the optional default
        ):
            self.missing(node, f"{path}.service", f"a {protocol} listener needs 'service': the upstream service name")
        if values.get("match") is not None and "allow_from" not in keys and "deny_from" not in keys:
            self.report(
                keys["match"][0], f"{path}.match",
                "'match' chooses the address allow_from/deny_from compare; add one of them or remove match",
            )
        if protocol is Protocol.UDP and values.get("service") in self.services:
            self.refuse_proxy_protocol_over_udp(keys["service"][1], f"{path}.service", values["service"])
        if self.errors > errors_before:
            return None
        listener = Listener(**values)
        if listener.original_src is not None:
            self.warn_per_client_pools(keys["original_src"][0], f"{path}.original_src", listener)
        return listener

    def misplaced(self, keys: Keys, path: str, protocol: Protocol | None) -> set[str]:
        """Reports and returns the keys this listener's protocol has no use for."""
        misplaced: set[str] = set()
        if protocol is None:
            return misplaced
        for key in keys:
            if key not in PROTOCOL_KEYS:
                continue
            protocols, instead = PROTOCOL_KEYS[key]
            if protocol not in protocols:
                misplaced.add(key)
                kinds = " and ".join(p.value for p in Protocol if p in protocols)
                self.report(
                    keys[key][0], f"{path}.{key}",
                    f"'{key}' is only for {kinds} listeners, not {protocol}; {instead.format(protocol=protocol)}",
                )
        return misplaced

    def refuse_proxy_protocol_over_udp(self, node: Node, path: str, name: str) -> None:
        version = self.services[name].send_proxy_protocol
        if version is not None:
            self.report(
                node, path,
                f"service '{name}' has send_proxy_protocol: {version}, which a udp listener cannot send (it is"
                " a TCP transport socket); use a service without send_proxy_protocol",
            )

    def warn_per_client_pools(self, node: Node, path: str, listener: Listener) -> None:
        for name in listener.services():
            service = self.services.get(name)  # absent when the service itself has errors
            version = service.send_proxy_protocol if service is not None else None
            if version is not None:
                self.report(
                    node, path,
                    f"original_src with send_proxy_protocol: {version} (service '{name}') on one path works,"
                    " but each upstream connection pool becomes per-client: Envoy reuses an upstream"
                    " connection only for the same client address; drop one of the two if the upstream"
                    " cannot take that many connections",
                    Severity.WARNING,
                )

    def service_ref(self, node: Node, path: str) -> str | None:
        known = self.service_names
        name = self.scalar_value(node)
        if not isinstance(name, str):
            what = f"a service name ({listing(known) or 'none defined'})"
            self.report(node, path, f"expected {what}, got {self.show(node)}")
            return None
        if name not in known:
            hint = suggest(self.did_you_mean(name, self.service_suggestions))
            defined = listing(known) or "none"
            self.report(node, path, f"unknown service {quoted(name)}{hint}; defined services: {defined}")
            return None
        return name

    def routes(self, node: Node, path: str) -> tuple[Route, ...]:
        items = self.sequence(node, path, "a list of {prefix, service}")
        if items == []:
            self.report(node, path, "an http listener needs at least one route: [{prefix: /, service: ...}]")
        # (index, prefix node, prefix, service) per route; a None prefix or service was reported
        parsed: list[tuple[int, Node, str | None, str | None]] = []
        for i, item in enumerate(items or []):
            item_path = f"{path}[{i}]"
            keys = self.mapping(item, item_path, ROUTE_KEYS, ROUTE_REQUIRED) or {}
            values = self.fields(keys, item_path, self.route_parsers)
            prefix_node = keys["prefix"][1] if "prefix" in keys else item
            parsed.append((i, prefix_node, values.get("prefix"), values.get("service")))
        shadowed = self.shadowed_prefixes(parsed, path)
        return tuple(
            Route(prefix, service)
            for i, _, prefix, service in parsed
            if prefix is not None and service is not None and i not in shadowed
        )

    def shadowed_prefixes(self, parsed: list[tuple[int, Node, str | None, str | None]], path: str) -> set[int]:
        """Reports and returns the routes an earlier route's prefix already matches.

        Envoy takes the first route whose prefix matches, so a later route under an earlier prefix never
        receives a request. In sorted order every prefix of a string comes before it, and all strings
        between the two also start with it; so a stack of the chain of prefixes of the current string
        holds exactly its prefixes, and keeping the earliest route along the stack finds the one that
        shadows it: O(n log n) for n routes, not a comparison of every pair.
        """
        shadowed: set[int] = set()
        stack: list[tuple[str, tuple[int, Node]]] = []  # (prefix, earliest route among it and those below)
        for prefix, i, node in sorted((p, i, n) for i, n, p, _ in parsed if p is not None):
            while stack and not prefix.startswith(stack[-1][0]):
                stack.pop()
            if stack and stack[-1][1][0] < i:
                first, first_node = stack[-1][1]
                shadow = parsed[first][2]
                self.report(
                    node, f"{path}[{i}].prefix",
                    f"prefix {quoted(prefix)} is never matched: routes[{first}] (line {self.line(first_node)})"
                    f" has prefix {quoted(shadow or '')}, which matches first; list longer prefixes first and each"
                    " prefix once",
                )
                shadowed.add(i)
            earliest = stack[-1][1] if stack and stack[-1][1][0] < i else (i, node)
            stack.append((prefix, earliest))
        return shadowed

    def prefix(self, node: Node, path: str) -> str | None:
        prefix = self.scalar(node, path, str, "a path prefix starting with '/'")
        if prefix is None:
            return None
        if not prefix.startswith("/"):
            self.report(node, path, f"prefix {quoted(prefix)} must start with '/'; valid: e.g. /, /api/")
            return None
        if WHITESPACE_RE.search(prefix):
            self.report(node, path, f"prefix {quoted(prefix)} contains whitespace, which no request path has; use %20")
            return None
        if not PREFIX_RE.fullmatch(prefix) or len(prefix) > PREFIX_MAX:
            self.report(
                node, path,
                f"prefix {quoted(prefix)} is not a request path: {PREFIX_MAX} printable ASCII characters at most;"
                " write any other byte %-encoded (e.g. /caf%C3%A9)",
            )
            return None
        return prefix

    def accept_proxy_protocol(self, node: Node, path: str) -> AcceptProxyProtocol | None:
        allowed = ["versions", "optional", "pass_through_tlvs"]
        if not self.is_mapping(node):
            return AcceptProxyProtocol() if self.switch(node, path, allowed) else None
        keys = self.keys(node, path, allowed)
        values = self.fields(keys, path, self.proxy_protocol_parsers)
        if "pass_through_tlvs" in keys and values.get("versions") == (ProxyProtocolVersion.V1,):
            self.report(
                keys["pass_through_tlvs"][0], f"{path}.pass_through_tlvs",
                "PROXY protocol v1 carries no TLVs; accept v2 too (versions: [v1, v2]) or remove pass_through_tlvs",
            )
            return None
        return None if None in values.values() else AcceptProxyProtocol(**values)

    def tlvs(self, node: Node, path: str) -> tuple[int, ...] | None:
        items = self.sequence(node, path, "a list of TLV types 0-255, e.g. [0xEA]")
        if items is None:
            return None
        tlvs = [self.integer(item, f"{path}[{i}]", 0, 255) for i, item in enumerate(items)]
        return None if None in tlvs else tuple(tlvs)

    def versions(self, node: Node, path: str) -> tuple[ProxyProtocolVersion, ...] | None:
        items = self.non_empty_sequence(
            node, path, "a list of PROXY protocol versions, e.g. [v1, v2]",
            "list at least one of v1, v2: an empty list refuses every connection",
        )
        if items is None:
            return None
        versions = [self.proxy_protocol_version(item, f"{path}[{i}]") for i, item in enumerate(items)]
        return None if None in versions else tuple(versions)

    def original_src(self, node: Node, path: str) -> OriginalSrc | None:
        allowed = ["mark", "placement", "upstream_interface", "table"]
        if not self.is_mapping(node):
            return OriginalSrc() if self.switch(node, path, allowed) else None
        keys = self.keys(node, path, allowed)
        values = self.fields(keys, path, self.original_src_parsers)
        if "upstream_interface" in keys and values.get("placement") is Placement.LOCAL:
            self.report(
                keys["upstream_interface"][0], f"{path}.upstream_interface",
                "upstream_interface is only used with 'placement: gateway'; remove it for a local upstream",
            )
            return None
        if "upstream_interface" not in keys and values.get("placement") is Placement.GATEWAY:
            self.missing(
                keys["placement"][1], f"{path}.upstream_interface",
                "placement 'gateway' needs upstream_interface: the interface the upstream's replies"
                " arrive on, e.g. upstream_interface: eth1",
            )
            return None
        return None if None in values.values() else OriginalSrc(**values)

    def mark(self, node: Node, path: str) -> int | None:
        return self.integer(node, path, 1, 2**32 - 1)

    def placement(self, node: Node, path: str) -> Placement | None:
        return self.choice(node, path, Placement, PLACEMENTS)

    def interface(self, node: Node, path: str) -> str | None:
        iface = self.scalar(node, path, str, "a network interface name, e.g. eth1")
        if iface is not None and not INTERFACE_RE.fullmatch(iface):
            self.report(node, path, f"{quoted(iface)} is not an interface name; valid: 1-15 of A-Z a-z 0-9 _ . @ -")
            return None
        return iface

    def table(self, node: Node, path: str) -> int | None:
        table = self.scalar(node, path, int, f"a routing table number, {TABLE_RULE}")
        if table is not None and (table in RESERVED_TABLES or not 1 <= table < 2**31):
            self.report(node, path, f"table {self.number_shown(node, table)} cannot be used; valid: {TABLE_RULE}")
            return None
        return table

    def networks(self, node: Node, path: str) -> tuple[IPNetwork, ...] | None:
        """allow_from / deny_from: CIDRs, or single addresses meaning /32 or /128."""
        items = self.non_empty_sequence(
            node, path, "a list of CIDRs, e.g. [10.0.0.0/8, 2001:db8::/32]",
            "an empty list has no effect; list CIDRs such as 10.0.0.0/8, or remove the key",
        )
        if items is None:
            return None
        networks = [self.network(item, f"{path}[{i}]") for i, item in enumerate(items)]
        return None if None in networks else tuple(networks)

    def network(self, node: Node, path: str) -> IPNetwork | None:
        text = self.scalar(node, path, str, "a CIDR such as 10.0.0.0/8, or one IP address")
        if text is None:
            return None
        try:
            # A scope (fe80::1%eth0/64) is an IPv6 network to Python, and malformed to Envoy.
            if "%" not in text:
                return ipaddress.ip_network(text)
        except ValueError:
            try:
                # Host bits set (10.1.2.3/8): almost always a typo for the network, so name it.
                intended = ipaddress.ip_network(text, strict=False)
                self.report(node, path, f"{quoted(text)} has host bits set; valid: {intended}")
                return None
            except ValueError:
                pass
        self.report(node, path, f"{quoted(text)} is not a CIDR; valid: e.g. 10.0.0.0/8, 192.0.2.7, 2001:db8::/32")
        return None

    def peer_match(self, node: Node, path: str) -> PeerMatch | None:
        return self.choice(node, path, PeerMatch, PEER_MATCHES)

    def access_log(self, node: Node, path: str) -> str | None:
        target = self.scalar(node, path, str, "stdout, stderr or an absolute file path")
        if target is None or target in ("stdout", "stderr"):
            return target
        if not target.startswith("/"):
            self.report(
                node, path,
                f"{quoted(target)} is relative, and Envoy would resolve it against its own working directory;"
                " valid: stdout, stderr or an absolute path such as /var/log/envoy/access.log",
            )
            return None
        problem = file_path_problem(target)
        if problem:
            self.report(node, path, f"{quoted(target)} {problem}; valid: e.g. /var/log/envoy/access.log")
            return None
        return target

    def sni_routes(self, node: Node, path: str) -> tuple[SniRoute, ...] | None:
        items = self.non_empty_sequence(
            node, path, "a list of {server_names, service}",
            "list at least one {server_names: [...], service: ...}, or remove sni_routes",
        )
        if items is None:
            return None
        required = {"server_names": "the SNI names this route takes", "service": "the upstream service name"}
        parsers: Parsers = {
            "server_names": ("server_names", self.server_names),
            "service": ("service", self.service_ref),
        }
        routes: list[SniRoute] = []
        claimed: dict[str, tuple[int, Node]] = {}  # name -> (index, server_names node) of the route taking it
        for i, item in enumerate(items):
            item_path = f"{path}[{i}]"
            keys = self.mapping(item, item_path, ["server_names", "service"], required) or {}
            values = self.fields(keys, item_path, parsers)
            if None in values.values() or len(values) < 2:
                continue
            names_node = keys["server_names"][1]
            taken = [name for name in values["server_names"] if name in claimed]
            if taken:
                first, first_node = claimed[taken[0]]
                self.report(names_node, f"{item_path}.server_names",
                            f"server name {quoted(taken[0])} is already routed by sni_routes[{first}] (line"
                            f" {self.line(first_node)}); each name picks one route")
                continue
            for name in values["server_names"]:
                claimed[name] = (i, names_node)
            routes.append(SniRoute(**values))
        return tuple(routes) if len(routes) == len(items) else None

    def xff(self, node: Node, path: str) -> Xff | None:
        keys = self.mapping(node, path, ["use_remote_address", "trusted_hops", "skip_append", "internal_cidrs"])
        if keys is None:
            return None
        values = self.fields(keys, path, self.xff_parsers)
        return None if None in values.values() else Xff(**values)

    def trusted_hops(self, node: Node, path: str) -> int | None:
        return self.integer(node, path, 0, 32)


class _PlainSchema(_Schema, PlainChecker):
    """The same schema on plain values (plain.py): a Topology, or NeedsPositions at the first finding."""


def _address_problem(text: str) -> str:
    """Why `text`, which matched neither address form, is not an address."""
    if "://" in text:
        return f"{quoted(text)} is a URL; write only host:port"
    if text.count(":") >= 2 and re.fullmatch(r"[0-9A-Fa-f:.]+", text):
        host, _, port = text.rpartition(":")
        example = f"[{host}]:{port}" if _is_ipv6(host) and port.isdigit() else f"[{text}]:PORT"
        return f"{quoted(text)}: an IPv6 address goes in brackets, e.g. {quoted(example)}"
    if not re.search(r":[0-9]+$", text):
        return f"{quoted(text)} has no port"
    return f"{quoted(text)} is not an address"


def _common_endpoints(joined: str, count: int) -> tuple[SocketAddress, ...] | None:
    """The endpoints of a list that holds only the common kind, distinct canonical ip:port strings,
    checked in one match instead of one at a time (50,000 endpoints make this the loop that counts);
    `joined` is the list's `count` texts joined by line breaks. None for any other list, which the
    checks one endpoint at a time then word findings for."""
    # A quoted value may hold a line break itself; then the count of them says so.
    if joined.count("\n") != count - 1 or not IPV4_PORTS_RE.fullmatch(joined):
        return None
    texts = joined.split("\n")
    # Canonical text: equal strings are equal addresses and distinct ones distinct.
    if len(set(texts)) != count:
        return None
    return tuple([SocketAddress(host, int(port)) for host, _, port in [text.rpartition(":") for text in texts]])


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def check_topology_text(
    text: str, file: str = "<topology>", max_bytes: int | None = None
) -> tuple[Topology | None, list[Diagnostic]]:
    """Validate text; returns the Topology (None on any error) and every diagnostic, warnings included.

    Text over `max_bytes` of UTF-8 (default: $KEEPSRC_MAX_TOPOLOGY_BYTES, else 64 MiB) is refused unparsed.
    """
    try:
        limit = max_bytes_limit(max_bytes)
    except ValueError as exc:
        return None, [Diagnostic(file, 1, 1, "", str(exc))]
    size = utf8_size(text, limit)
    if size > limit:
        return None, [too_large(file, size, limit)]
    # Both passes run, and free what they read (on return), with the collector paused: released
    # after it resumes, the ~300,000 nodes and marks of a 1.5 MB file would first be counted as new
    # objects and traversed by a collection (40 ms).
    with cycle_collection_paused():
        topology = check_plain(text, file)
        if topology is not None:
            return topology, []
        return check_precisely(text, file)


def check_plain(text: str, file: str) -> Topology | None:
    """The plain pass (plain.py): the Topology of a file with no finding at all, else None."""
    document = read_plain(text)
    if document is None:
        return None
    try:
        return _PlainSchema(file, text=text).topology(document)
    except NeedsPositions:
        return None


def check_precisely(text: str, file: str) -> tuple[Topology | None, list[Diagnostic]]:
    """The precise pass: composed nodes, every finding at its line and column."""
    root, diagnostics = compose(text, file)
    if root is None:
        return None, diagnostics
    schema = _Schema(file)
    topology = schema.topology(root)
    diagnostics = sorted(schema.diagnostics, key=lambda d: (d.line, d.col))
    return (None if schema.errors else topology), diagnostics


@contextmanager
def cycle_collection_paused() -> Iterator[None]:
    """Pauses Python's cycle collector (process-wide) while a topology is read and built. Composing
    allocates a few objects per byte, which triggers full collections over everything alive: on
    1.5 MB that doubled the load time, made it grow faster than the file, and (in a server) held
    the GIL 50-300 ms at a time, stalling the event loop. Nodes and model objects hold no cycles
    (anchors are refused), so reference counting frees them as before; the collector resumes as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def check_topology(path: str | Path, max_bytes: int | None = None) -> tuple[Topology | None, list[Diagnostic]]:
    """check_topology_text on a file; a file over `max_bytes` is refused before it is read."""
    path = Path(path)
    try:
        limit = max_bytes_limit(max_bytes)
    except ValueError as exc:
        return None, [Diagnostic(str(path), 1, 1, "", str(exc))]
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)  # a pipe or /dev/zero has no size to ask for first
            if len(data) > limit:
                size = max(path.stat().st_size, len(data))
                return None, [too_large(str(path), size, limit)]
    except OSError as exc:
        return None, [Diagnostic(str(path), 1, 1, "", f"cannot read topology file: {exc.strerror or exc}")]
    return check_topology_bytes(data, str(path), max_bytes)


def check_topology_bytes(data: bytes, file: str, max_bytes: int | None = None) -> tuple[Topology | None,
                                                                                      list[Diagnostic]]:
    """check_topology_text on bytes read from `file` (a path, or a store's key): UTF-8, a BOM allowed."""
    try:
        # utf-8-sig: editors on Windows save a byte-order mark, which is not part of the YAML.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - data.rfind(b"\n", 0, exc.start)
        message = f"not UTF-8: byte 0x{data[exc.start]:02x} cannot be decoded; save the file as UTF-8"
        return None, [Diagnostic(file, line, col, "", message)]
    return check_topology_text(text, file, max_bytes)


def load_topology(path: str | Path, max_bytes: int | None = None) -> Topology:
    """Load and validate a topology file; raises TopologyError listing every error."""
    topology, diagnostics = check_topology(path, max_bytes)
    if topology is None:
        raise TopologyError(diagnostics)
    return topology
