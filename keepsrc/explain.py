"""`keepsrc explain`: walk every path through the topology and say where the client address is
carried, and where (and why) it is lost.

A path starts at a listener no other proxy sends to (or at --from), follows each service it
routes to, and continues wherever a service's endpoint is another proxy's listener, until it
reaches a backend outside the topology. Pure analysis of the Topology; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from keepsrc.topology.model import (
    Listener,
    Placement,
    Protocol,
    Proxy,
    Service,
    SocketAddress,
    Topology,
)


class Severity(StrEnum):
    LOST = "lost"  # the client address does not reach the next hop (exit code 1)
    WARNING = "warning"  # it arrives, at a cost or with a caveat


@dataclass(frozen=True)
class Finding:
    severity: Severity
    where: str  # proxy/listener or service name
    message: str
    fix: str


@dataclass
class Step:
    """One line of a path: what happens to the client address at this point."""

    where: str
    text: str
    kept: bool


@dataclass
class Path:
    start: str
    steps: list[Step] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def lost(self) -> bool:
        return any(f.severity is Severity.LOST for f in self.findings)


@dataclass(frozen=True)
class _Arrival:
    """How the client address arrives at a hop: `how` is None when it is already lost."""

    how: str | None
    xff_appenders: int = 0  # proxies in front that appended to X-Forwarded-For, for trusted_hops
    sends_proxy_protocol: bool = False
    sender: str = ""  # who hands the connection to this hop; empty for a client connecting directly


def _name(proxy: Proxy, listener: Listener) -> str:
    return f"{proxy.name}/{listener.name}"


def _listener_index(topology: Topology) -> dict[SocketAddress, tuple[Proxy, Listener]]:
    return {
        listener.address: (proxy, listener)
        for proxy in topology.proxies.values()
        for listener in proxy.listeners
    }


def _local_hosts(proxy: Proxy) -> set[str]:
    return {listener.address.host for listener in proxy.listeners}


def _is_local(host: str, proxy: Proxy) -> bool:
    return host in _local_hosts(proxy) or host == "localhost" or host.startswith("127.") or host == "::1"


def entry_listeners(topology: Topology) -> list[tuple[Proxy, Listener]]:
    """Listeners no service of the topology points at: where clients come in."""
    targets = {ep for service in topology.services.values() for ep in service.endpoints}
    return [
        (proxy, listener)
        for proxy in topology.proxies.values()
        for listener in proxy.listeners
        if listener.address not in targets
    ]


class _Walker:
    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.index = _listener_index(topology)

    def walk(self, proxy: Proxy, listener: Listener) -> Path:
        path = Path(start=_name(proxy, listener))
        if listener.accept_proxy_protocol is not None:
            arrival = _Arrival("PROXY protocol header from the load balancer in front", sends_proxy_protocol=True,
                               sender="the load balancer in front")
        else:
            arrival = _Arrival("the client connects directly: it is the peer")
        self._hop(path, proxy, listener, arrival, seen=set())
        return path

    def _hop(self, path: Path, proxy: Proxy, listener: Listener, arrival: _Arrival, seen: set[str]) -> None:
        where = _name(proxy, listener)
        if where in seen:
            path.steps.append(Step(where, "loops back to a listener already on this path; stopping", False))
            return
        seen = seen | {where}
        arrival = self._check_acceptance(path, where, listener, arrival)
        known = arrival.how is not None
        path.steps.append(Step(where, f"client address: {arrival.how}" if known else "client address already lost",
                               known))
        self._check_rules(path, where, listener, known)
        for service_name in listener.services():
            service = self.topology.services[service_name]
            self._check_sticky(path, where, service, known)
            outgoing = self._outgoing(path, proxy, listener, service, arrival if known else None)
            backends = []
            for endpoint in service.endpoints:
                target = self.index.get(endpoint)
                if target is not None:
                    self._hop(path, target[0], target[1], outgoing, seen)
                else:
                    backends.append(endpoint)
            if backends:
                self._backend(path, where, service, backends, outgoing)

    # -- what arrives, and whether the listener reads it -----------------------------------------
    def _check_acceptance(self, path: Path, where: str, listener: Listener, arrival: _Arrival) -> _Arrival:
        accepts = listener.accept_proxy_protocol is not None
        if arrival.sends_proxy_protocol and not accepts:
            path.findings.append(Finding(
                Severity.LOST, where,
                f"{arrival.sender} sends a PROXY protocol header but this listener does not accept one: "
                "the header reaches the application as garbage",
                f"set accept_proxy_protocol: true on {where}, or stop sending it",
            ))
            return _Arrival(None)
        if accepts and not arrival.sends_proxy_protocol and arrival.sender:
            optional = listener.accept_proxy_protocol is not None and listener.accept_proxy_protocol.optional
            consequence = ("connections without it pass, but the address they carry is the sender's"
                           if optional else "Envoy waits for a header that never comes and drops the connection")
            path.findings.append(Finding(
                Severity.LOST, where,
                f"this listener expects a PROXY protocol header but {arrival.sender} does not send one: {consequence}",
                f"set send_proxy_protocol: v2 on {arrival.sender}, or drop accept_proxy_protocol",
            ))
            return _Arrival(None)
        if arrival.how is None:
            return arrival
        if listener.protocol is Protocol.HTTP and arrival.xff_appenders:
            self._check_trusted_hops(path, where, listener, arrival)
        return arrival

    def _check_trusted_hops(self, path: Path, where: str, listener: Listener, arrival: _Arrival) -> None:
        trusted = listener.xff.trusted_hops if listener.xff is not None else 0
        use_remote = listener.xff is not None and listener.xff.use_remote_address
        expected = arrival.xff_appenders
        if not use_remote:
            path.findings.append(Finding(
                Severity.WARNING, where,
                "use_remote_address is off: Envoy takes the client from the rightmost X-Forwarded-For entry, "
                "and no rule here can tell a forged header from a proxy's",
                f"set xff: {{use_remote_address: true, trusted_hops: {expected}}}",
            ))
        elif trusted > expected:
            path.findings.append(Finding(
                Severity.LOST, where,
                f"xff.trusted_hops is {trusted} but only {expected} prox{'y' if expected == 1 else 'ies'} in front "
                "append to X-Forwarded-For: an address the client wrote itself is trusted",
                f"set xff.trusted_hops: {expected}",
            ))
        elif trusted < expected:
            path.findings.append(Finding(
                Severity.LOST, where,
                f"xff.trusted_hops is {trusted} but {expected} prox{'y' if expected == 1 else 'ies'} in front "
                "append to X-Forwarded-For: the address taken as the client is a proxy's",
                f"set xff.trusted_hops: {expected}",
            ))

    def _check_rules(self, path: Path, where: str, listener: Listener, known: bool) -> None:
        if (listener.allow_from or listener.deny_from) and not known:
            path.findings.append(Finding(
                Severity.LOST, where,
                "allow_from/deny_from here would match a proxy's address, not the client's",
                "carry the client address to this hop first (see the findings before this one)",
            ))

    def _check_sticky(self, path: Path, where: str, service: Service, known: bool) -> None:
        if service.sticky is not None and not known:
            path.findings.append(Finding(
                Severity.LOST, service.name,
                f"sticky: client_ip on '{service.name}' hashes a proxy's address at {where}: "
                "every client lands on the same backend",
                f"carry the client address to {where} first",
            ))

    # -- how this hop hands the address on ---------------------------------------------------------
    def _outgoing(self, path: Path, proxy: Proxy, listener: Listener, service: Service,
                  arrival: _Arrival | None) -> _Arrival:
        where = _name(proxy, listener)
        pp = service.send_proxy_protocol
        if listener.original_src is not None and pp is not None:
            path.findings.append(Finding(
                Severity.WARNING, where,
                f"original_src and send_proxy_protocol (service '{service.name}') on one path: both work, but Envoy "
                "keeps one upstream connection pool per client address",
                "keep one of the two unless the next hop needs both",
            ))
        sends_pp = pp is not None
        sender = f"service '{service.name}'"
        if arrival is None:
            return _Arrival(None, sends_proxy_protocol=sends_pp, sender=sender)
        if listener.original_src is not None and self._original_src_ok(path, proxy, listener, service):
            how = f"original_src: {where} connects from the client's own IP (mark {listener.original_src.mark})"
            return _Arrival(how, sends_proxy_protocol=sends_pp, sender=sender)
        if sends_pp:
            return _Arrival(f"PROXY protocol {pp} header sent by {where} ({sender})",
                            sends_proxy_protocol=True, sender=sender)
        if listener.protocol is Protocol.HTTP and listener.xff is not None and listener.xff.use_remote_address \
                and not listener.xff.skip_append:
            return _Arrival(f"X-Forwarded-For, appended by {where}", xff_appenders=arrival.xff_appenders + 1,
                            sender=sender)
        if listener.protocol is Protocol.HTTP and arrival.xff_appenders:
            # Envoy passes X-Forwarded-For on unchanged: the next hop sees the same appenders.
            return _Arrival(f"X-Forwarded-For, passed on unchanged by {where}", xff_appenders=arrival.xff_appenders,
                            sender=sender)
        return _Arrival(None, sender=sender)

    def _original_src_ok(self, path: Path, proxy: Proxy, listener: Listener, service: Service) -> bool:
        where = _name(proxy, listener)
        original_src = listener.original_src
        assert original_src is not None
        if original_src.placement is None:
            path.findings.append(Finding(
                Severity.LOST, where,
                "original_src without a placement: the upstream's replies must be routed back through this host, "
                "and `keepsrc netplan` cannot tell how",
                "set original_src.placement: local (upstream on this host) or gateway (with upstream_interface)",
            ))
            return False
        remote = [ep for ep in service.endpoints if not _is_local(ep.host, proxy)]
        if original_src.placement is Placement.LOCAL and remote:
            path.findings.append(Finding(
                Severity.LOST, where,
                f"original_src with placement local, but '{service.name}' has endpoints on other hosts "
                f"({', '.join(map(str, remote))}): their replies go to the client, not back through Envoy",
                f"set original_src: {{placement: gateway, upstream_interface: <interface towards {remote[0].host}>}}",
            ))
            return False
        return True

    def _backend(self, path: Path, where: str, service: Service, endpoints: list[SocketAddress],
                 arrival: _Arrival) -> None:
        endpoint = ", ".join(map(str, endpoints))
        if arrival.how is None:
            path.steps.append(Step(f"{service.name} {endpoint}", f"backend sees {where}'s address, not the client's",
                                   False))
            path.findings.append(Finding(
                Severity.LOST, where,
                f"nothing carries the client address from {where} to '{service.name}' ({endpoint})",
                "use send_proxy_protocol on the service (if the backend reads PROXY protocol), original_src on "
                "the listener, or xff on an http listener",
            ))
            return
        if arrival.sends_proxy_protocol:
            reads = "the backend must read the PROXY protocol header (e.g. nginx `listen ... proxy_protocol`)"
        elif arrival.xff_appenders:
            reads = "the backend reads X-Forwarded-For"
        else:
            reads = "the backend sees the client as its peer (TCP connection or UDP source)"
        path.steps.append(Step(f"{service.name} {endpoint}", f"{arrival.how}; {reads}", True))


def explain(topology: Topology, start: str | None = None) -> list[Path]:
    """Every path from the entry listeners (or from `start`: 'proxy/listener' or a listener name)."""
    walker = _Walker(topology)
    if start is None:
        starts = entry_listeners(topology)
    else:
        starts = [
            (proxy, listener)
            for proxy in topology.proxies.values()
            for listener in proxy.listeners
            if start in (listener.name, _name(proxy, listener))
        ]
        if not starts:
            names = ", ".join(_name(p, lst) for p in topology.proxies.values() for lst in p.listeners)
            raise KeyError(f"no listener '{start}'; listeners: {names}")
    return [walker.walk(proxy, listener) for proxy, listener in starts]


def render_text(paths: list[Path]) -> str:
    lines = []
    for path in paths:
        lines.append(f"{path.start}: {'LOST' if path.lost else 'kept'}")
        for step in path.steps:
            lines.append(f"  {'ok  ' if step.kept else 'LOST'} {step.where}: {step.text}")
        for finding in path.findings:
            lines.append(f"  {finding.severity.value.upper()}: {finding.where}: {finding.message}")
            lines.append(f"      fix: {finding.fix}")
    return "\n".join(lines) + "\n"


def to_json(paths: list[Path]) -> list[dict[str, object]]:
    return [
        {
            "start": p.start,
            "kept": not p.lost,
            "steps": [{"where": s.where, "kept": s.kept, "text": s.text} for s in p.steps],
            "findings": [
                {"severity": f.severity.value, "where": f.where, "message": f.message, "fix": f.fix}
                for f in p.findings
            ],
        }
        for p in paths
    ]
