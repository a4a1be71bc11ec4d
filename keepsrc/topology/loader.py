"""Topology YAML -> Topology, validating every key against schema v1 (documented in docs/topology.md).

The file is composed into PyYAML nodes rather than loaded into plain dicts so that every
finding can name the line and column of the offending key or value. All findings of one
file are collected in a single pass; a file with any error yields no Topology.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

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
    SocketAddress,
    Sticky,
    Topology,
    Xff,
)

API_VERSION = "keepsrc/v1"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_RULE = "letters, digits, '_', '.', '-', starting with a letter or digit"
DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m)")
DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000}
DURATION_RULE = "a positive number with unit ms, s or m, e.g. 250ms, 1s, 1.5s, 5m"
DURATION_MAX_MS = 315_576_000_000 * 1000  # google.protobuf.Duration: 10,000 years; longer cannot be encoded
HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
INTERFACE_RE = re.compile(r"[A-Za-z0-9_.@-]{1,15}")  # IFNAMSIZ is 16 including the NUL
# Tables the kernel reserves (unspec, default, main, local): routing marked replies there breaks the host.
RESERVED_TABLES = {0, 253, 254, 255}
TABLE_RULE = "1 to 252 or 256 to 2147483647 (0 and 253-255 are the kernel's own tables)"
LISTENER_KEYS = [
    "name", "address", "protocol", "service", "routes", "accept_proxy_protocol", "tls_inspector",
    "original_src", "xff", "allow_from", "deny_from", "match", "access_log", "stat_prefix", "idle_timeout",
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
}
# Hints appended to PyYAML's own wording, keyed by a fragment of its problem or context text.
YAML_HINTS = {
    "'\\t'": "YAML indents with spaces, never tabs",
    "expected ',' or ']'": "is a ']' missing?",
    "expected ',' or '}'": "is a '}' missing?",
    "quoted scalar": "is a closing quote missing?",
    "mapping values are not allowed here": "quote a value that contains ': ', or check the indentation",
    "expected <block end>": "check the indentation",
    "another document": "a topology is one YAML document; remove the second '---'",
}

T = TypeVar("T")
_UNREADABLE = object()  # a scalar whose explicit tag could not construct it (e.g. `!!int abc`)


class _Checker:
    """Walks the composed YAML, building model objects and collecting diagnostics."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.diagnostics: list[Diagnostic] = []
        # Per check, not per module: SafeConstructor caches every node it constructs and is not thread-safe.
        self.constructor = yaml.constructor.SafeConstructor()
        # Key paths an unknown key was already reported as a likely typo of ("did you mean"), so that
        # the same typo is not reported a second time as that key missing.
        self.suggested: set[str] = set()
        # Every defined service name, valid definition or not, so a broken service is not also "unknown".
        self.service_names: list[str] = []
        self.services: dict[str, Service] = {}

    # -- reporting -------------------------------------------------------------------------
    def report(self, node: Node, path: str, message: str, severity: Severity = Severity.ERROR) -> None:
        mark = node.start_mark
        self.diagnostics.append(
            Diagnostic(self.file, mark.line + 1, mark.column + 1, path, message, severity)
        )

    def missing(self, node: Node, path: str, message: str) -> None:
        if path not in self.suggested:
            self.report(node, path, message)

    def error_count(self) -> int:
        return sum(1 for d in self.diagnostics if d.severity is Severity.ERROR)

    # -- structural helpers ----------------------------------------------------------------
    def mapping(
        self, node: Node, path: str, allowed: list[str], required: dict[str, str] | None = None
    ) -> dict[str, tuple[Node, Node]] | None:
        """Keys of a mapping node -> (key node, value node); None after reporting a non-mapping."""
        if not isinstance(node, MappingNode):
            expected = f"expected a mapping with keys {_listing(allowed)}"
            self.report(node, path, f"{expected}, got {self.show(node)}")
            return None
        return self.keys(node, path, allowed, required)

    def keys(
        self, node: MappingNode, path: str, allowed: list[str], required: dict[str, str] | None = None
    ) -> dict[str, tuple[Node, Node]]:
        """Reports unknown, duplicate and missing keys; `required` maps each required key to what it holds."""
        out: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.report(key_node, path, f"keys must be plain strings, got {self.show(key_node)}")
                continue
            key = key_node.value
            key_path = _join(path, key)
            if key == "<<":
                self.report(
                    key_node, key_path, "YAML merge keys ('<<') are not supported; write the keys out"
                )
            elif key not in allowed:
                hint = _did_you_mean(key, allowed)
                if hint:
                    self.suggested.add(_join(path, hint))
                valid = _listing(allowed)
                self.report(key_node, key_path, f"unknown key '{key}'{_suggest(hint)}; valid keys: {valid}")
            elif key in out:
                first = out[key][0].start_mark.line + 1
                self.report(key_node, key_path, f"duplicate key '{key}' (first on line {first}); keep one")
            else:
                out[key] = (key_node, value_node)
        for key, holds in (required or {}).items():
            if key not in out:
                self.missing(node, _join(path, key), f"missing required key '{key}': {holds}")
        return out

    def named_mapping(self, node: Node, path: str, what: str) -> list[tuple[str, Node]]:
        """A mapping whose keys are user-chosen names (services, proxies): [(name, value node)]."""
        if not isinstance(node, MappingNode):
            self.report(node, path, f"expected a mapping of {what}, got {self.show(node)}")
            return []
        seen: dict[str, int] = {}
        out = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.report(key_node, path, f"a name must be a plain string, got {self.show(key_node)}")
                continue
            name = key_node.value
            key_path = _join(path, name)
            if not NAME_RE.fullmatch(name):
                self.report(key_node, key_path, f"invalid name {name!r}; valid: {NAME_RULE}")
            elif name in seen:
                first = seen[name]
                self.report(key_node, key_path, f"duplicate name '{name}' (first on line {first}); keep one")
            else:
                seen[name] = key_node.start_mark.line + 1
                out.append((name, value_node))
        return out

    def sequence(self, node: Node, path: str, what: str) -> list[Node] | None:
        """The items of a list node; None after reporting a non-list. `what` describes a valid list."""
        if not isinstance(node, SequenceNode):
            self.report(node, path, f"expected {what}, got {self.show(node)}")
            return None
        return list(node.value)

    def construct(self, node: ScalarNode) -> Any:
        try:
            return self.constructor.construct_object(node)
        # An explicit tag (`!!int abc`, `!!timestamp x`, `!custom`) runs that tag's constructor on
        # arbitrary text, and each fails in its own way; the finding is the same for all of them.
        except Exception:
            return _UNREADABLE

    def show(self, node: Node) -> str:
        """A node as the user wrote it, for "got ..." in messages."""
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        value = self.construct(node)
        if value is _UNREADABLE:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            return f"{node.value!r} with tag {tag}, which keepsrc cannot read; remove the tag"
        if value is None:
            return "an empty value"
        if isinstance(value, str):
            return repr(value)
        # As written, plus what YAML made of it: `no` is a boolean and `2001-12-14` a date, not text.
        kind = {bool: "a boolean", int: "a number", float: "a number"}.get(type(value), type(value).__name__)
        return f"{node.value} ({kind})"

    def scalar(self, node: Node, path: str, kind: type, what: str) -> Any:
        """The node's value if it is a scalar of `kind`; reports and returns None otherwise."""
        if isinstance(node, ScalarNode):
            value = self.construct(node)
            if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
                return value
        self.report(node, path, f"expected {what}, got {self.show(node)}")
        return None

    def boolean(self, node: Node, path: str) -> bool | None:
        return self.scalar(node, path, bool, "true or false")

    def switch(self, node: Node, path: str, allowed: list[str]) -> bool | None:
        """The `true`/`false` form of a key that also takes a mapping of settings."""
        return self.scalar(node, path, bool, f"true, false or a mapping with keys {_listing(allowed)}")

    def integer(self, node: Node, path: str, lo: int, hi: int) -> int | None:
        value = self.scalar(node, path, int, f"an integer from {lo} to {hi}")
        if value is not None and not lo <= value <= hi:
            self.report(node, path, f"{value} is out of range; valid: {lo} to {hi}")
            return None
        return value

    def name(self, node: Node, path: str) -> str | None:
        value = self.scalar(node, path, str, f"a name ({NAME_RULE})")
        if value is not None and not NAME_RE.fullmatch(value):
            self.report(node, path, f"invalid name {value!r}; valid: {NAME_RULE}")
            return None
        return value

    def choice(self, node: Node, path: str, enum: Callable[[str], T], options: list[str]) -> T | None:
        value = self.scalar(node, path, str, f"one of {_listing(options)}")
        if value is None:
            return None
        if value not in options:
            hint = _suggest(_did_you_mean(value, options))
            self.report(node, path, f"'{value}' is not valid{hint}; valid: {_listing(options)}")
            return None
        return enum(value)

    def duration_ms(self, node: Node, path: str) -> int | None:
        value = self.scalar(node, path, str, DURATION_RULE)
        if value is None:
            return None
        match = DURATION_RE.fullmatch(value)
        # Below 1ms the millisecond model rounds to 0, which Envoy rejects for every timeout here.
        ms = float(match.group(1)) * DURATION_UNITS_MS[match.group(2)] if match else 0
        if ms < 1:
            self.report(node, path, f"'{value}' is not a duration of at least 1ms; valid: {DURATION_RULE}")
            return None
        if ms > DURATION_MAX_MS:
            self.report(node, path, f"'{value}' is longer than Envoy can encode; valid: at most 315576000000s")
            return None
        return int(ms)

    def socket_address(self, node: Node, path: str, allow_hostname: bool) -> SocketAddress | None:
        forms = "ip:port or [ipv6]:port" + (" or hostname:port" if allow_hostname else "")
        text = self.scalar(node, path, str, f"an address ({forms})")
        if text is None:
            return None
        match = re.fullmatch(r"\[([^\]]*)\]:([0-9]+)", text) or re.fullmatch(r"([^:\[\]]+):([0-9]+)", text)
        if not match:
            self.report(node, path, f"{_address_problem(text)}; valid: {forms}")
            return None
        host, port = match.group(1), int(match.group(2))
        if not 1 <= port <= 65535:
            self.report(node, path, f"port {port} in '{text}' is out of range; valid: 1 to 65535")
            return None
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if not allow_hostname:
                self.report(
                    node, path,
                    f"'{host}' is not an IP address; a listener binds an IP, e.g. 0.0.0.0:{port} (every IPv4"
                    f" address), 127.0.0.1:{port} or [::]:{port}",
                )
                return None
            if text.startswith("[") or not HOSTNAME_RE.fullmatch(host):
                self.report(node, path, f"'{host}' is neither an IP address nor a hostname; valid: {forms}")
                return None
            return SocketAddress(host, port)
        if text.startswith("[") != (ip.version == 6):
            self.report(node, path, f"'{text}': only IPv6 addresses go in brackets; valid: {ip}:{port}")
            return None
        # Canonical text, so that [::1]:80 and [0:0::1]:80 are recognised as one address.
        return SocketAddress(str(ip), port)

    # -- schema ------------------------------------------------------------------------------
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
                self.report(node, "apiVersion", f"unsupported apiVersion '{version}'; valid: {API_VERSION}")
        if "services" in keys:
            defined = self.named_mapping(keys["services"][1], "services", "service name -> settings")
            self.service_names = [name for name, _ in defined]
            for name, value in defined:
                service = self.service(name, value, f"services.{name}")
                if service is not None:
                    self.services[name] = service
        proxies: dict[str, Proxy] = {}
        if "proxies" in keys:
            for name, value in self.named_mapping(keys["proxies"][1], "proxies", "proxy name -> listeners"):
                proxies[name] = self.proxy(name, value, f"proxies.{name}")
        return Topology(services=self.services, proxies=proxies)

    def service(self, name: str, node: Node, path: str) -> Service | None:
        allowed = ["endpoints", "connect_timeout", "lb", "send_proxy_protocol", "health_check", "sticky"]
        errors_before = self.error_count()
        keys = self.mapping(node, path, allowed, {"endpoints": "a list of ip:port or hostname:port"})
        if keys is None:
            return None
        values: dict[str, Any] = {}
        if "endpoints" in keys:
            values["endpoints"] = self.endpoints(keys["endpoints"][1], f"{path}.endpoints")
        if "connect_timeout" in keys:
            timeout = keys["connect_timeout"][1]
            values["connect_timeout_ms"] = self.duration_ms(timeout, f"{path}.connect_timeout")
        if "lb" in keys:
            values["lb"] = self.choice(keys["lb"][1], f"{path}.lb", LbPolicy, [p.value for p in LbPolicy])
        if "send_proxy_protocol" in keys:
            values["send_proxy_protocol"] = self.choice(
                keys["send_proxy_protocol"][1],
                f"{path}.send_proxy_protocol",
                ProxyProtocolVersion,
                [v.value for v in ProxyProtocolVersion],
            )
        if "health_check" in keys:
            values["health_check"] = self.health_check(keys["health_check"][1], f"{path}.health_check")
        if "sticky" in keys:
            values["sticky"] = self.choice(keys["sticky"][1], f"{path}.sticky", Sticky, [s.value for s in Sticky])
            lb = values.get("lb")  # None when lb is absent (then ring_hash) or already reported
            if values["sticky"] is not None and lb is not None and lb not in (LbPolicy.RING_HASH, LbPolicy.MAGLEV):
                self.report(
                    keys["lb"][1], f"{path}.lb",
                    f"lb '{values['lb']}' cannot keep a client on one endpoint; with sticky use ring_hash or"
                    " maglev, or leave lb out (ring_hash)",
                )
        # Counting errors rather than testing values for None: `health_check: false` is a valid None.
        if self.error_count() > errors_before:
            return None
        return Service(name=name, **values)

    def endpoints(self, node: Node, path: str) -> tuple[SocketAddress, ...]:
        items = self.sequence(node, path, "a list of ip:port or hostname:port")
        if items == []:
            self.report(node, path, "a service needs at least one endpoint (ip:port or hostname:port)")
        endpoints: list[SocketAddress] = []
        for i, item in enumerate(items or []):
            address = self.socket_address(item, f"{path}[{i}]", allow_hostname=True)
            if address is None:
                continue
            if address in endpoints:
                self.report(item, f"{path}[{i}]", f"duplicate endpoint '{address}'; list each endpoint once")
            else:
                endpoints.append(address)
        return tuple(endpoints)

    def health_check(self, node: Node, path: str) -> HealthCheck | None:
        allowed = ["interval", "timeout", "unhealthy_threshold", "healthy_threshold"]
        if not isinstance(node, MappingNode):
            return HealthCheck() if self.switch(node, path, allowed) else None
        keys = self.keys(node, path, allowed)
        values: dict[str, Any] = {}
        if "interval" in keys:
            values["interval_ms"] = self.duration_ms(keys["interval"][1], f"{path}.interval")
        if "timeout" in keys:
            values["timeout_ms"] = self.duration_ms(keys["timeout"][1], f"{path}.timeout")
        for key in ("unhealthy_threshold", "healthy_threshold"):
            if key in keys:
                values[key] = self.integer(keys[key][1], f"{path}.{key}", 1, 100)
        if None in values.values():
            return None
        return HealthCheck(**values)

    def proxy(self, name: str, node: Node, path: str) -> Proxy:
        keys = self.mapping(node, path, ["listeners"], {"listeners": "a list of listeners"}) or {}
        listeners: list[Listener] = []
        # Envoy refuses a second listener with a name or an address already taken on the same node.
        names: dict[str, str] = {}
        addresses: dict[object, str] = {}
        if "listeners" in keys:
            items = self.sequence(keys["listeners"][1], f"{path}.listeners", "a list of listeners") or []
            for i, item in enumerate(items):
                listener = self.listener(item, f"{path}.listeners[{i}]", name, names, addresses)
                if listener is not None:
                    listeners.append(listener)
        return Proxy(name=name, listeners=tuple(listeners))

    def claim(self, taken: dict[Any, str], value: object, node: Node, path: str, problem: str) -> None:
        """Records that the listener at `path` uses `value`; reports it if an earlier listener does."""
        listener_path, _, key = path.rpartition(".")
        if value in taken:
            self.report(node, path, f"{problem}: {taken[value]} has it; each listener needs its own {key}")
        else:
            taken[value] = f"{listener_path.rpartition('.')[2]} (line {node.start_mark.line + 1})"

    def listener(
        self, node: Node, path: str, proxy: str, names: dict[str, str], addresses: dict[object, str]
    ) -> Listener | None:
        errors_before = self.error_count()
        required = {
            "name": "a name unique within the proxy",
            "address": "the ip:port to listen on",
            "protocol": "tcp, http or udp",
        }
        keys = self.mapping(node, path, LISTENER_KEYS, required)
        if keys is None:
            return None
        values: dict[str, Any] = {}
        protocol = None
        if "protocol" in keys:
            options = [p.value for p in Protocol]
            protocol = self.choice(keys["protocol"][1], f"{path}.protocol", Protocol, options)
            values["protocol"] = protocol
        if "name" in keys:
            values["name"] = self.name(keys["name"][1], f"{path}.name")
            if values["name"] is not None:
                problem = f"duplicate listener name '{values['name']}' on proxy '{proxy}'"
                self.claim(names, values["name"], keys["name"][1], f"{path}.name", problem)
        if "address" in keys:
            address = keys["address"][1]
            values["address"] = self.socket_address(address, f"{path}.address", allow_hostname=False)
            if values["address"] is not None:
                problem = f"duplicate address {values['address']} on proxy '{proxy}'"
                # A udp and a tcp socket may share an ip:port; two of one kind may not.
                claimed = (protocol is Protocol.UDP, values["address"])
                self.claim(addresses, claimed, address, f"{path}.address", problem)
        misplaced = self.misplaced(keys, path, protocol)
        # key -> (Listener field, parser)
        parsers: dict[str, tuple[str, Callable[[Node, str], Any]]] = {
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
        }
        for key, (field, parse) in parsers.items():
            if key in keys and key not in misplaced:
                values[field] = parse(keys[key][1], f"{path}.{key}")
        if protocol is Protocol.HTTP and "routes" not in keys:
            self.missing(node, f"{path}.routes", "an http listener needs 'routes': a list of {prefix, service}")
        elif protocol in (Protocol.TCP, Protocol.UDP) and "service" not in keys:
            self.missing(node, f"{path}.service", f"a {protocol} listener needs 'service': the upstream service name")
        if values.get("match") is not None and "allow_from" not in keys and "deny_from" not in keys:
            self.report(
                keys["match"][0], f"{path}.match",
                "'match' chooses the address allow_from/deny_from compare; add one of them or remove match",
            )
        if protocol is Protocol.UDP and values.get("service") in self.services:
            self.refuse_proxy_protocol_over_udp(keys["service"][1], f"{path}.service", values["service"])
        if self.error_count() > errors_before:
            return None
        listener = Listener(**values)
        if listener.original_src is not None:
            self.warn_per_client_pools(keys["original_src"][0], f"{path}.original_src", listener)
        return listener

    def misplaced(self, keys: dict[str, tuple[Node, Node]], path: str, protocol: Protocol | None) -> set[str]:
        """Reports and returns the keys this listener's protocol has no use for."""
        misplaced = set()
        for key, (protocols, instead) in PROTOCOL_KEYS.items():
            if key in keys and protocol is not None and protocol not in protocols:
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
        name = self.scalar(node, path, str, f"a service name ({_listing(known) or 'none defined'})")
        if name is not None and name not in known:
            hint = _suggest(_did_you_mean(name, known))
            defined = _listing(known) or "none"
            self.report(node, path, f"unknown service '{name}'{hint}; defined services: {defined}")
            return None
        return name

    def routes(self, node: Node, path: str) -> tuple[Route, ...]:
        items = self.sequence(node, path, "a list of {prefix, service}")
        if items == []:
            self.report(
                node, path, "an http listener needs at least one route: [{prefix: /, service: ...}]"
            )
        routes: list[Route] = []
        earlier: list[tuple[str, str]] = []  # (prefix, "routes[i] (line n)") of the routes before this one
        for i, item in enumerate(items or []):
            item_path = f"{path}[{i}]"
            required = {"prefix": "the path prefix to match, e.g. /", "service": "the upstream service name"}
            keys = self.mapping(item, item_path, ["prefix", "service"], required) or {}
            prefix = None
            if "prefix" in keys:
                prefix = self.prefix(keys["prefix"][1], f"{item_path}.prefix", earlier)
                if prefix is not None:
                    earlier.append((prefix, f"routes[{i}] (line {keys['prefix'][1].start_mark.line + 1})"))
            service = None
            if "service" in keys:
                service = self.service_ref(keys["service"][1], f"{item_path}.service")
            if prefix is not None and service is not None:
                routes.append(Route(prefix, service))
        return tuple(routes)

    def prefix(self, node: Node, path: str, earlier: list[tuple[str, str]]) -> str | None:
        prefix = self.scalar(node, path, str, "a path prefix starting with '/'")
        if prefix is None:
            return None
        if not prefix.startswith("/"):
            self.report(node, path, f"prefix '{prefix}' must start with '/'; valid: e.g. /, /api/")
            return None
        if re.search(r"\s", prefix):
            self.report(
                node, path, f"prefix {prefix!r} contains whitespace, which no request path has; use %20"
            )
            return None
        # Envoy takes the first route whose prefix matches, so a later route under an earlier
        # prefix never receives a request.
        for shadow, where in earlier:
            if prefix.startswith(shadow):
                self.report(
                    node, path,
                    f"prefix '{prefix}' is never matched: {where} has prefix '{shadow}', which matches first;"
                    " list longer prefixes first and each prefix once",
                )
                return None
        return prefix

    def accept_proxy_protocol(self, node: Node, path: str) -> AcceptProxyProtocol | None:
        allowed = ["versions", "optional", "pass_through_tlvs"]
        if not isinstance(node, MappingNode):
            return AcceptProxyProtocol() if self.switch(node, path, allowed) else None
        keys = self.keys(node, path, allowed)
        values: dict[str, Any] = {}
        if "versions" in keys:
            values["versions"] = self.versions(keys["versions"][1], f"{path}.versions")
        if "optional" in keys:
            values["optional"] = self.boolean(keys["optional"][1], f"{path}.optional")
        if "pass_through_tlvs" in keys:
            values["pass_through_tlvs"] = self.tlvs(keys["pass_through_tlvs"][1], f"{path}.pass_through_tlvs")
            if values.get("versions") == (ProxyProtocolVersion.V1,):
                self.report(
                    keys["pass_through_tlvs"][0], f"{path}.pass_through_tlvs",
                    "PROXY protocol v1 carries no TLVs; accept v2 too (versions: [v1, v2]) or remove"
                    " pass_through_tlvs",
                )
        if None in values.values():
            return None
        return AcceptProxyProtocol(**values)

    def tlvs(self, node: Node, path: str) -> tuple[int, ...] | None:
        items = self.sequence(node, path, "a list of TLV types 0-255, e.g. [0xEA]")
        if items is None:
            return None
        tlvs = [self.integer(item, f"{path}[{i}]", 0, 255) for i, item in enumerate(items)]
        return None if None in tlvs else tuple(tlvs)

    def versions(self, node: Node, path: str) -> tuple[ProxyProtocolVersion, ...] | None:
        options = [v.value for v in ProxyProtocolVersion]
        items = self.sequence(node, path, "a list of PROXY protocol versions, e.g. [v1, v2]")
        if items is None:
            return None
        if not items:
            self.report(node, path, "list at least one of v1, v2: an empty list refuses every connection")
            return None
        versions = [
            self.choice(item, f"{path}[{i}]", ProxyProtocolVersion, options) for i, item in enumerate(items)
        ]
        return None if None in versions else tuple(versions)

    def original_src(self, node: Node, path: str) -> OriginalSrc | None:
        allowed = ["mark", "placement", "upstream_interface", "table"]
        if not isinstance(node, MappingNode):
            return OriginalSrc() if self.switch(node, path, allowed) else None
        keys = self.keys(node, path, allowed)
        values: dict[str, Any] = {}
        if "mark" in keys:
            values["mark"] = self.integer(keys["mark"][1], f"{path}.mark", 1, 2**32 - 1)
        if "placement" in keys:
            values["placement"] = self.choice(
                keys["placement"][1], f"{path}.placement", Placement, [p.value for p in Placement]
            )
        if "upstream_interface" in keys:
            iface = keys["upstream_interface"][1]
            values["upstream_interface"] = self.interface(iface, f"{path}.upstream_interface")
            if values.get("placement") is Placement.LOCAL:
                self.report(
                    keys["upstream_interface"][0], f"{path}.upstream_interface",
                    "upstream_interface is only used with 'placement: gateway'; remove it for a local"
                    " upstream",
                )
        elif values.get("placement") is Placement.GATEWAY:
            self.missing(
                keys["placement"][1], f"{path}.upstream_interface",
                "placement 'gateway' needs upstream_interface: the interface the upstream's replies"
                " arrive on, e.g. upstream_interface: eth1",
            )
        if "table" in keys:
            values["table"] = self.table(keys["table"][1], f"{path}.table")
        if None in values.values():
            return None
        return OriginalSrc(**values)

    def interface(self, node: Node, path: str) -> str | None:
        iface = self.scalar(node, path, str, "a network interface name, e.g. eth1")
        if iface is not None and not INTERFACE_RE.fullmatch(iface):
            self.report(node, path, f"'{iface}' is not an interface name; valid: 1-15 of A-Z a-z 0-9 _ . @ -")
            return None
        return iface

    def table(self, node: Node, path: str) -> int | None:
        table = self.scalar(node, path, int, f"a routing table number, {TABLE_RULE}")
        if table is not None and (table in RESERVED_TABLES or not 1 <= table < 2**31):
            self.report(node, path, f"table {table} cannot be used; valid: {TABLE_RULE}")
            return None
        return table

    def networks(self, node: Node, path: str) -> tuple[IPNetwork, ...] | None:
        """allow_from / deny_from: CIDRs, or single addresses meaning /32 or /128."""
        items = self.sequence(node, path, "a list of CIDRs, e.g. [10.0.0.0/8, 2001:db8::/32]")
        if items is None:
            return None
        if not items:
            self.report(node, path, "an empty list has no effect; list CIDRs such as 10.0.0.0/8, or remove the key")
            return None
        networks = [self.network(item, f"{path}[{i}]") for i, item in enumerate(items)]
        return None if None in networks else tuple(networks)

    def network(self, node: Node, path: str) -> IPNetwork | None:
        text = self.scalar(node, path, str, "a CIDR such as 10.0.0.0/8, or one IP address")
        if text is None:
            return None
        try:
            return ipaddress.ip_network(text)
        except ValueError:
            pass
        try:
            # Host bits set (10.1.2.3/8): almost always a typo for the network, so name it.
            intended = ipaddress.ip_network(text, strict=False)
            self.report(node, path, f"'{text}' has host bits set; valid: {intended}")
        except ValueError:
            self.report(node, path, f"'{text}' is not a CIDR; valid: e.g. 10.0.0.0/8, 192.0.2.7, 2001:db8::/32")
        return None

    def peer_match(self, node: Node, path: str) -> PeerMatch | None:
        return self.choice(node, path, PeerMatch, [m.value for m in PeerMatch])

    def access_log(self, node: Node, path: str) -> str | None:
        target = self.scalar(node, path, str, "stdout, stderr or an absolute file path")
        if target is not None and target not in ("stdout", "stderr") and not target.startswith("/"):
            self.report(
                node, path,
                f"'{target}' is relative, and Envoy would resolve it against its own working directory;"
                " valid: stdout, stderr or an absolute path such as /var/log/envoy/access.log",
            )
            return None
        return target

    def xff(self, node: Node, path: str) -> Xff | None:
        keys = self.mapping(node, path, ["use_remote_address", "trusted_hops", "skip_append", "internal_cidrs"])
        if keys is None:
            return None
        values: dict[str, Any] = {}
        if "internal_cidrs" in keys:
            values["internal_cidrs"] = self.networks(keys["internal_cidrs"][1], f"{path}.internal_cidrs")
        if "use_remote_address" in keys:
            remote = keys["use_remote_address"][1]
            values["use_remote_address"] = self.boolean(remote, f"{path}.use_remote_address")
        if "trusted_hops" in keys:
            values["trusted_hops"] = self.integer(keys["trusted_hops"][1], f"{path}.trusted_hops", 0, 32)
        if "skip_append" in keys:
            values["skip_append"] = self.boolean(keys["skip_append"][1], f"{path}.skip_append")
        if None in values.values():
            return None
        return Xff(**values)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _listing(options: Iterable[str]) -> str:
    return ", ".join(options)


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    """The closest option, ignoring case ('TCP' -> 'tcp'), or '' when none is close."""
    by_lower = {option.lower(): option for option in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else ""


def _suggest(option: str) -> str:
    return f" (did you mean '{option}'?)" if option else ""


def _address_problem(text: str) -> str:
    """Why `text`, which matched neither address form, is not an address."""
    if "://" in text:
        return f"'{text}' is a URL; write only host:port"
    if text.count(":") >= 2 and re.fullmatch(r"[0-9A-Fa-f:.]+", text):
        host, _, port = text.rpartition(":")
        example = f"[{host}]:{port}" if _is_ipv6(host) and port.isdigit() else f"[{text}]:PORT"
        return f"'{text}': an IPv6 address goes in brackets, e.g. '{example}'"
    if not re.search(r":[0-9]+$", text):
        return f"'{text}' has no port"
    return f"'{text}' is not an address"


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def _syntax_error(file: str, exc: yaml.MarkedYAMLError) -> Diagnostic:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    message = f"YAML syntax error: {exc.problem or exc.context}"
    if exc.context and exc.problem:
        where = exc.context_mark
        at = f" at line {where.line + 1}, column {where.column + 1}" if where and where is not mark else ""
        message += f" ({exc.context}{at})"
    hints = [hint for fragment, hint in YAML_HINTS.items() if fragment in f"{exc.problem} {exc.context}"]
    return Diagnostic(file, line, col, "", "; ".join([message, *hints]))


def _compose_fast(text: str) -> Node | None:
    """libyaml's composer, ~7x faster on large files; any trouble falls back to the Python one."""
    if not yaml.__with_libyaml__:
        return None
    try:
        return yaml.compose(text, Loader=yaml.CSafeLoader)
    except (yaml.YAMLError, RecursionError, ValueError):
        return None  # the pure-Python loader below re-reads it for its precise messages


def check_topology_text(text: str, file: str = "<topology>") -> tuple[Topology | None, list[Diagnostic]]:
    """Validate text; returns the Topology (None on any error) and every diagnostic, warnings included."""
    root = _compose_fast(text)
    if root is not None:
        return _check(root, file)
    try:
        loader = yaml.SafeLoader(text)  # the reader refuses non-printable characters right here
    except yaml.reader.ReaderError as exc:  # it has an offset, not a mark
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - text.rfind("\n", 0, exc.position)
        message = f"YAML syntax error: non-printable character U+{exc.character:04X} is not allowed; remove it"
        return None, [Diagnostic(file, line, col, "", message)]
    try:
        root = loader.get_single_node()  # what yaml.compose() does, keeping the loader for its mark
    except yaml.MarkedYAMLError as exc:
        return None, [_syntax_error(file, exc)]
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        mark = loader.get_mark()
        message = "YAML syntax error: nested too deeply to read; a topology needs only a few levels"
        return None, [Diagnostic(file, mark.line + 1, mark.column + 1, "", message)]
    finally:
        loader.dispose()
    if root is None:
        message = f"empty file; a topology starts with 'apiVersion: {API_VERSION}'"
        return None, [Diagnostic(file, 1, 1, "", message)]
    return _check(root, file)


def _check(root: Node, file: str) -> tuple[Topology | None, list[Diagnostic]]:
    checker = _Checker(file)
    topology = checker.topology(root)
    diagnostics = sorted(checker.diagnostics, key=lambda d: (d.line, d.col))
    if any(d.severity is Severity.ERROR for d in diagnostics):
        return None, diagnostics
    return topology, diagnostics


def check_topology(path: str | Path) -> tuple[Topology | None, list[Diagnostic]]:
    path = Path(path)
    try:
        # utf-8-sig: editors on Windows save a byte-order mark, which is not part of the YAML.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        col = exc.start - exc.object.rfind(b"\n", 0, exc.start)
        message = f"not UTF-8: byte 0x{exc.object[exc.start]:02x} cannot be decoded; save the file as UTF-8"
        return None, [Diagnostic(str(path), line, col, "", message)]
    except OSError as exc:
        return None, [Diagnostic(str(path), 1, 1, "", f"cannot read topology file: {exc.strerror or exc}")]
    return check_topology_text(text, str(path))


def load_topology(path: str | Path) -> Topology:
    """Load and validate a topology file; raises TopologyError listing every error."""
    topology, diagnostics = check_topology(path)
    if topology is None:
        raise TopologyError(diagnostics)
    return topology
