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
    LbPolicy,
    Listener,
    OriginalSrc,
    Placement,
    Protocol,
    Proxy,
    ProxyProtocolVersion,
    Route,
    Service,
    SocketAddress,
    Topology,
    Xff,
)

API_VERSION = "keepsrc/v1"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)$")
DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000}
# Tables the kernel reserves (unspec, default, main, local): routing marked replies there breaks the host.
RESERVED_TABLES = {0, 253, 254, 255}

T = TypeVar("T")
_constructor = yaml.constructor.SafeConstructor()


class _Checker:
    """Walks the composed YAML, building model objects and collecting diagnostics."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.diagnostics: list[Diagnostic] = []

    # -- reporting -------------------------------------------------------------------------
    def report(self, node: Node, path: str, message: str, severity: Severity = Severity.ERROR) -> None:
        mark = node.start_mark
        self.diagnostics.append(Diagnostic(self.file, mark.line + 1, mark.column + 1, path, message, severity))

    def error_count(self) -> int:
        return sum(1 for d in self.diagnostics if d.severity is Severity.ERROR)

    # -- structural helpers ----------------------------------------------------------------
    def mapping(
        self, node: Node, path: str, allowed: Iterable[str], required: Iterable[str] = ()
    ) -> dict[str, tuple[Node, Node]] | None:
        """Keys of a mapping node -> (key node, value node); reports unknown, duplicate and missing keys."""
        if not isinstance(node, MappingNode):
            self.report(node, path, f"expected a mapping with keys {_listing(allowed)}, got {_kind(node)}")
            return None
        allowed = list(allowed)
        out: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            key_path = _join(path, str(key))
            if key is None:
                self.report(key_node, path, "keys must be plain strings")
            elif key not in allowed:
                hint = _did_you_mean(key, allowed)
                self.report(key_node, key_path, f"unknown key '{key}'{hint}; valid keys: {_listing(allowed)}")
            elif key in out:
                first = out[key][0].start_mark.line + 1
                self.report(key_node, key_path, f"duplicate key '{key}' (first set on line {first})")
            else:
                out[key] = (key_node, value_node)
        for key in required:
            if key not in out:
                self.report(node, _join(path, key), f"missing required key '{key}'")
        return out

    def named_mapping(self, node: Node, path: str) -> list[tuple[str, Node, Node]]:
        """A mapping whose keys are user-chosen names (services, proxies)."""
        if not isinstance(node, MappingNode):
            self.report(node, path, f"expected a mapping of name -> definition, got {_kind(node)}")
            return []
        seen: dict[str, int] = {}
        out = []
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, ScalarNode) else ""
            key_path = _join(path, str(name))
            if not isinstance(name, str) or not NAME_RE.match(name):
                self.report(key_node, key_path, f"invalid name {name!r}: use letters, digits, '_', '.', '-'")
                continue
            if name in seen:
                self.report(key_node, key_path, f"duplicate name '{name}' (first defined on line {seen[name]})")
                continue
            seen[name] = key_node.start_mark.line + 1
            out.append((name, key_node, value_node))
        return out

    def sequence(self, node: Node, path: str) -> list[Node]:
        if not isinstance(node, SequenceNode):
            self.report(node, path, f"expected a list, got {_kind(node)}")
            return []
        return list(node.value)

    def scalar(self, node: Node, path: str, kind: type, what: str) -> Any:
        """The node's value if it is a scalar of `kind`; reports and returns None otherwise."""
        if isinstance(node, ScalarNode):
            value = _constructor.construct_object(node)
            if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
                return value
            shown = repr(value)
        else:
            shown = _kind(node)
        self.report(node, path, f"expected {what}, got {shown}")
        return None

    def string(self, node: Node, path: str) -> str | None:
        return self.scalar(node, path, str, "a string")

    def boolean(self, node: Node, path: str) -> bool | None:
        return self.scalar(node, path, bool, "true or false")

    def integer(self, node: Node, path: str, lo: int, hi: int) -> int | None:
        value = self.scalar(node, path, int, f"an integer from {lo} to {hi}")
        if value is not None and not lo <= value <= hi:
            self.report(node, path, f"{value} is out of range; valid: {lo} to {hi}")
            return None
        return value

    def choice(self, node: Node, path: str, enum: Callable[[str], T], options: list[str]) -> T | None:
        value = self.scalar(node, path, str, f"one of {_listing(options)}")
        if value is None:
            return None
        if value not in options:
            self.report(node, path, f"'{value}' is not valid{_did_you_mean(value, options)}; valid: {_listing(options)}")
            return None
        return enum(value)

    def duration_ms(self, node: Node, path: str) -> int | None:
        value = self.scalar(node, path, str, "a duration such as 250ms, 1s or 5m")
        if value is None:
            return None
        match = DURATION_RE.match(value)
        if not match or float(match.group(1)) <= 0:
            self.report(node, path, f"'{value}' is not a positive duration; valid: e.g. 250ms, 1s, 1.5s, 5m")
            return None
        return int(float(match.group(1)) * DURATION_UNITS_MS[match.group(2)])

    def socket_address(self, node: Node, path: str, allow_hostname: bool) -> SocketAddress | None:
        text = self.string(node, path)
        if text is None:
            return None
        valid = "ip:port, [ipv6]:port" + (" or hostname:port" if allow_hostname else "")
        match = re.match(r"^\[([^\]]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]+):(\d+)$", text)
        if not match:
            self.report(node, path, f"'{text}' is not an address; valid: {valid}")
            return None
        host, port = match.group(1), int(match.group(2))
        if not 1 <= port <= 65535:
            self.report(node, path, f"port {port} in '{text}' is out of range; valid: 1 to 65535")
            return None
        try:
            ip = ipaddress.ip_address(host)
            if text.startswith("[") != (ip.version == 6):
                self.report(node, path, f"'{text}': IPv6 addresses go in brackets, IPv4 without; valid: {valid}")
                return None
        except ValueError:
            if not allow_hostname:
                self.report(node, path, f"'{host}' is not an IP address; a listener binds an IP: {valid}")
                return None
            if text.startswith("[") or not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", host):
                self.report(node, path, f"'{host}' is neither an IP address nor a hostname; valid: {valid}")
                return None
        return SocketAddress(host, port)

    # -- schema ------------------------------------------------------------------------------
    def topology(self, root: Node) -> Topology:
        keys = self.mapping(root, "", ["apiVersion", "services", "proxies"], ["apiVersion", "proxies"]) or {}
        if "apiVersion" in keys:
            node = keys["apiVersion"][1]
            version = self.string(node, "apiVersion")
            if version is not None and version != API_VERSION:
                self.report(node, "apiVersion", f"unsupported apiVersion '{version}'; valid: {API_VERSION}")
        services: dict[str, Service] = {}
        known_services: list[str] = []
        if "services" in keys:
            for name, _key, value in self.named_mapping(keys["services"][1], "services"):
                known_services.append(name)
                service = self.service(name, value, f"services.{name}")
                if service is not None:
                    services[name] = service
        proxies: dict[str, Proxy] = {}
        if "proxies" in keys:
            for name, _key, value in self.named_mapping(keys["proxies"][1], "proxies"):
                proxies[name] = self.proxy(name, value, f"proxies.{name}", known_services, services)
        return Topology(services=services, proxies=proxies)

    def service(self, name: str, node: Node, path: str) -> Service | None:
        allowed = ["endpoints", "connect_timeout", "lb", "send_proxy_protocol", "health_check"]
        keys = self.mapping(node, path, allowed, ["endpoints"])
        if keys is None:
            return None
        ok = True
        endpoints: list[SocketAddress] = []
        if "endpoints" in keys:
            items = self.sequence(keys["endpoints"][1], f"{path}.endpoints")
            if isinstance(keys["endpoints"][1], SequenceNode) and not items:
                self.report(keys["endpoints"][1], f"{path}.endpoints", "a service needs at least one endpoint")
                ok = False
            for i, item in enumerate(items):
                address = self.socket_address(item, f"{path}.endpoints[{i}]", allow_hostname=True)
                if address is None:
                    ok = False
                elif address in endpoints:
                    self.report(item, f"{path}.endpoints[{i}]", f"duplicate endpoint '{address}'")
                    ok = False
                else:
                    endpoints.append(address)
        kwargs: dict[str, Any] = {}
        if "connect_timeout" in keys:
            kwargs["connect_timeout_ms"] = self.duration_ms(keys["connect_timeout"][1], f"{path}.connect_timeout")
        if "lb" in keys:
            kwargs["lb"] = self.choice(keys["lb"][1], f"{path}.lb", LbPolicy, [p.value for p in LbPolicy])
        if "send_proxy_protocol" in keys:
            kwargs["send_proxy_protocol"] = self.choice(
                keys["send_proxy_protocol"][1],
                f"{path}.send_proxy_protocol",
                ProxyProtocolVersion,
                [v.value for v in ProxyProtocolVersion],
            )
        if "health_check" in keys:
            kwargs["health_check"] = self.health_check(keys["health_check"][1], f"{path}.health_check")
        if not ok or any(v is None for v in kwargs.values()):
            return None
        return Service(name=name, endpoints=tuple(endpoints), **kwargs)

    def health_check(self, node: Node, path: str) -> HealthCheck | None:
        if isinstance(node, ScalarNode):
            enabled = self.boolean(node, path)
            return HealthCheck() if enabled else None
        keys = self.mapping(node, path, ["interval", "timeout", "unhealthy_threshold", "healthy_threshold"])
        if keys is None:
            return None
        kwargs: dict[str, Any] = {}
        if "interval" in keys:
            kwargs["interval_ms"] = self.duration_ms(keys["interval"][1], f"{path}.interval")
        if "timeout" in keys:
            kwargs["timeout_ms"] = self.duration_ms(keys["timeout"][1], f"{path}.timeout")
        for key in ("unhealthy_threshold", "healthy_threshold"):
            if key in keys:
                kwargs[key] = self.integer(keys[key][1], f"{path}.{key}", 1, 100)
        if any(v is None for v in kwargs.values()):
            return None
        return HealthCheck(**kwargs)

    def proxy(
        self, name: str, node: Node, path: str, known: list[str], services: dict[str, Service]
    ) -> Proxy:
        keys = self.mapping(node, path, ["listeners"], ["listeners"]) or {}
        listeners: list[Listener] = []
        names: dict[str, int] = {}
        addresses: dict[SocketAddress, int] = {}
        if "listeners" in keys:
            for i, item in enumerate(self.sequence(keys["listeners"][1], f"{path}.listeners")):
                item_path = f"{path}.listeners[{i}]"
                listener = self.listener(item, item_path, known)
                if listener is None:
                    continue
                if listener.name in names:
                    self.report(
                        item, f"{item_path}.name",
                        f"duplicate listener name '{listener.name}' on proxy '{name}' (also listeners[{names[listener.name]}])",
                    )
                    continue
                if listener.address in addresses:
                    self.report(
                        item, f"{item_path}.address",
                        f"address {listener.address} is already used by listeners[{addresses[listener.address]}]"
                        f" on proxy '{name}'; each listener needs its own ip:port",
                    )
                    continue
                names[listener.name] = i
                addresses[listener.address] = i
                listeners.append(listener)
                self.warn_per_client_pools(item, item_path, listener, services)
        return Proxy(name=name, listeners=tuple(listeners))

    def warn_per_client_pools(self, node: Node, path: str, listener: Listener, services: dict[str, Service]) -> None:
        if listener.original_src is None:
            return
        for service_name in listener.services():
            service = services.get(service_name)
            if service is not None and service.send_proxy_protocol is not None:
                self.report(
                    node, path,
                    f"original_src and send_proxy_protocol (service '{service_name}') on one path: both work, but"
                    " Envoy then keeps one upstream connection pool per client address",
                    Severity.WARNING,
                )

    def listener(self, node: Node, path: str, known: list[str]) -> Listener | None:
        allowed = [
            "name", "address", "protocol", "service", "routes",
            "accept_proxy_protocol", "tls_inspector", "original_src", "xff",
        ]
        errors_before = self.error_count()
        keys = self.mapping(node, path, allowed, ["name", "address", "protocol"])
        if keys is None:
            return None
        values: dict[str, Any] = {}
        if "name" in keys:
            values["name"] = self.string(keys["name"][1], f"{path}.name")
            if values["name"] is not None and not NAME_RE.match(values["name"]):
                self.report(keys["name"][1], f"{path}.name", f"invalid name {values['name']!r}: use letters, digits, '_', '.', '-'")
                values["name"] = None
        if "address" in keys:
            values["address"] = self.socket_address(keys["address"][1], f"{path}.address", allow_hostname=False)
        protocol = None
        if "protocol" in keys:
            protocol = self.choice(keys["protocol"][1], f"{path}.protocol", Protocol, [p.value for p in Protocol])
            values["protocol"] = protocol
        if "service" in keys:
            if protocol is Protocol.HTTP:
                self.report(keys["service"][0], f"{path}.service", "'service' is for tcp listeners; an http listener uses 'routes'")
                values["service"] = None
            else:
                values["service"] = self.service_ref(keys["service"][1], f"{path}.service", known)
        elif protocol is Protocol.TCP:
            self.report(node, f"{path}.service", "a tcp listener needs 'service': the upstream service name")
            values["service"] = None
        if "routes" in keys:
            if protocol is Protocol.TCP:
                self.report(keys["routes"][0], f"{path}.routes", "'routes' is for http listeners; a tcp listener uses 'service'")
                values["routes"] = None
            else:
                values["routes"] = self.routes(keys["routes"][1], f"{path}.routes", known)
        elif protocol is Protocol.HTTP:
            self.report(node, f"{path}.routes", "an http listener needs 'routes': a list of {prefix, service}")
            values["routes"] = None
        if "accept_proxy_protocol" in keys:
            values["accept_proxy_protocol"] = self.accept_proxy_protocol(
                keys["accept_proxy_protocol"][1], f"{path}.accept_proxy_protocol"
            )
        if "tls_inspector" in keys:
            values["tls_inspector"] = self.boolean(keys["tls_inspector"][1], f"{path}.tls_inspector")
        if "original_src" in keys:
            values["original_src"] = self.original_src(keys["original_src"][1], f"{path}.original_src")
        if "xff" in keys:
            if protocol is Protocol.TCP:
                self.report(keys["xff"][0], f"{path}.xff", "'xff' is for http listeners: a tcp listener has no X-Forwarded-For")
                values["xff"] = None
            else:
                values["xff"] = self.xff(keys["xff"][1], f"{path}.xff")
        if self.error_count() > errors_before:
            return None
        return Listener(**values)

    def service_ref(self, node: Node, path: str, known: list[str]) -> str | None:
        name = self.string(node, path)
        if name is not None and name not in known:
            self.report(
                node, path,
                f"unknown service '{name}'{_did_you_mean(name, known)}; defined services: {_listing(known) or 'none'}",
            )
            return None
        return name

    def routes(self, node: Node, path: str, known: list[str]) -> tuple[Route, ...] | None:
        items = self.sequence(node, path)
        if isinstance(node, SequenceNode) and not items:
            self.report(node, path, "an http listener needs at least one route")
            return None
        routes: list[Route] = []
        ok = isinstance(node, SequenceNode)
        for i, item in enumerate(items):
            item_path = f"{path}[{i}]"
            keys = self.mapping(item, item_path, ["prefix", "service"], ["prefix", "service"])
            if keys is None or len(keys) < 2:
                ok = False
                continue
            prefix = self.string(keys["prefix"][1], f"{item_path}.prefix")
            if prefix is not None and not prefix.startswith("/"):
                self.report(keys["prefix"][1], f"{item_path}.prefix", f"'{prefix}' must start with '/'")
                prefix = None
            service = self.service_ref(keys["service"][1], f"{item_path}.service", known)
            if prefix is None or service is None:
                ok = False
                continue
            routes.append(Route(prefix, service))
        return tuple(routes) if ok else None

    def accept_proxy_protocol(self, node: Node, path: str) -> AcceptProxyProtocol | None:
        if isinstance(node, ScalarNode):
            return AcceptProxyProtocol() if self.boolean(node, path) else None
        keys = self.mapping(node, path, ["versions", "optional", "pass_through_tlvs"])
        if keys is None:
            return None
        kwargs: dict[str, Any] = {}
        if "versions" in keys:
            options = [v.value for v in ProxyProtocolVersion]
            items = self.sequence(keys["versions"][1], f"{path}.versions")
            versions = [self.choice(n, f"{path}.versions[{i}]", ProxyProtocolVersion, options) for i, n in enumerate(items)]
            if not items:
                self.report(keys["versions"][1], f"{path}.versions", "list at least one of v1, v2")
            kwargs["versions"] = tuple(versions) if versions and None not in versions else None
        if "optional" in keys:
            kwargs["optional"] = self.boolean(keys["optional"][1], f"{path}.optional")
        if "pass_through_tlvs" in keys:
            items = self.sequence(keys["pass_through_tlvs"][1], f"{path}.pass_through_tlvs")
            tlvs = [self.integer(n, f"{path}.pass_through_tlvs[{i}]", 0, 255) for i, n in enumerate(items)]
            kwargs["pass_through_tlvs"] = tuple(tlvs) if None not in tlvs else None
        if any(v is None for v in kwargs.values()):
            return None
        return AcceptProxyProtocol(**kwargs)

    def original_src(self, node: Node, path: str) -> OriginalSrc | None:
        if isinstance(node, ScalarNode):
            return OriginalSrc() if self.boolean(node, path) else None
        keys = self.mapping(node, path, ["mark", "placement", "upstream_interface", "table"])
        if keys is None:
            return None
        kwargs: dict[str, Any] = {}
        if "mark" in keys:
            kwargs["mark"] = self.integer(keys["mark"][1], f"{path}.mark", 1, 2**32 - 1)
        if "placement" in keys:
            kwargs["placement"] = self.choice(
                keys["placement"][1], f"{path}.placement", Placement, [p.value for p in Placement]
            )
        if "upstream_interface" in keys:
            iface = self.string(keys["upstream_interface"][1], f"{path}.upstream_interface")
            if iface is not None and not re.match(r"^[A-Za-z0-9_.@-]{1,15}$", iface):
                self.report(keys["upstream_interface"][1], f"{path}.upstream_interface",
                            f"'{iface}' is not an interface name (1-15 of letters, digits, _ . @ -)")
                iface = None
            kwargs["upstream_interface"] = iface
        if "table" in keys:
            table = self.integer(keys["table"][1], f"{path}.table", 1, 2**31 - 1)
            if table in RESERVED_TABLES:
                self.report(keys["table"][1], f"{path}.table", f"table {table} is reserved by the kernel; pick another")
                table = None
            kwargs["table"] = table
        if any(v is None for v in kwargs.values()):
            return None
        result = OriginalSrc(**kwargs)
        if result.placement is Placement.GATEWAY and result.upstream_interface is None:
            self.report(node, f"{path}.upstream_interface",
                        "placement 'gateway' needs upstream_interface: the interface upstream replies arrive on")
            return None
        return result

    def xff(self, node: Node, path: str) -> Xff | None:
        keys = self.mapping(node, path, ["use_remote_address", "trusted_hops", "skip_append"])
        if keys is None:
            return None
        kwargs: dict[str, Any] = {}
        if "use_remote_address" in keys:
            kwargs["use_remote_address"] = self.boolean(keys["use_remote_address"][1], f"{path}.use_remote_address")
        if "trusted_hops" in keys:
            kwargs["trusted_hops"] = self.integer(keys["trusted_hops"][1], f"{path}.trusted_hops", 0, 32)
        if "skip_append" in keys:
            kwargs["skip_append"] = self.boolean(keys["skip_append"][1], f"{path}.skip_append")
        if any(v is None for v in kwargs.values()):
            return None
        return Xff(**kwargs)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return repr(_constructor.construct_object(node))


def _listing(options: Iterable[str]) -> str:
    return ", ".join(options)


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_topology_text(text: str, file: str = "<topology>") -> tuple[Topology | None, list[Diagnostic]]:
    """Validate text; returns the Topology (None on any error) and every diagnostic, warnings included."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        return None, [Diagnostic(file, line, col, "", f"YAML syntax error: {problem}{context}")]
    except yaml.YAMLError as exc:
        return None, [Diagnostic(file, 1, 1, "", f"YAML error: {exc}")]
    checker = _Checker(file)
    if root is None:
        return None, [Diagnostic(file, 1, 1, "", f"empty file; a topology starts with 'apiVersion: {API_VERSION}'")]
    topology = checker.topology(root)
    diagnostics = sorted(checker.diagnostics, key=lambda d: (d.line, d.col))
    if any(d.severity is Severity.ERROR for d in diagnostics):
        return None, diagnostics
    return topology, diagnostics


def check_topology(path: str | Path) -> tuple[Topology | None, list[Diagnostic]]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Diagnostic(str(path), 1, 1, "", f"cannot read topology file: {exc}")]
    return check_topology_text(text, str(path))


def load_topology(path: str | Path) -> Topology:
    """Load and validate a topology file; raises TopologyError listing every error."""
    topology, diagnostics = check_topology(path)
    if topology is None:
        raise TopologyError(diagnostics)
    return topology
