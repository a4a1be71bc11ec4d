"""`keepsrc explain`: walk every path through the topology and say where the client address is
carried, and where (and why) it is lost.

A path starts at a listener no other proxy sends to (or at --from), follows each service it
routes to, and continues wherever a service's endpoint is another proxy's listener, until it
reaches a backend outside the topology. Pure analysis of the Topology; no I/O.

Paths are never walked one by one: 7 tiers of 8 proxies, each tier's service listing every proxy
of the next, make 8^7 of them. What a hop does to the address depends only on its listener and on
how the address arrives there, so each (listener, arrival) is evaluated once, and the paths from a
start are summarized from that graph: every distinct step once, hops that fare the same in one
line, and per outcome (a backend, or a loop) how many paths end in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from keepsrc.topology.model import (
    Listener,
    PeerMatch,
    Placement,
    Protocol,
    Proxy,
    Service,
    SocketAddress,
    Topology,
)

# Stands, in a step's text, for the hops that hand the address on: which those are depends on the
# start the step is reached from, so the name is filled in per start (see _summarize).
SENDER_HOPS = "{by}"


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
    """One line of a start's paths: what happens to the client address at this point.

    `where` names one hop, several hops that fare the same, or a backend (service and endpoints).
    """

    where: str
    text: str
    kept: bool
    paths: int = 1  # paths from the start that pass through here
    outcome: bool = False  # paths end here: a backend, or a loop


@dataclass
class Path:
    """Every path from one start listener, merged hop by hop."""

    start: str
    steps: list[Step] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    paths: int = 1  # distinct paths from the start to an outcome
    lost_paths: int = 0  # of those, the ones through a hop with a LOST finding

    @property
    def lost(self) -> bool:
        return self.lost_paths > 0


@dataclass(frozen=True)
class _Arrival:
    """How the client address arrives at a hop: `how` is None when it is already lost.

    This is the memo key (with the listener), so it names the sending service but never the
    sending hop: `how` has SENDER_HOPS where that hop's name goes.
    """

    how: str | None
    xff_appenders: int = 0  # proxies in front that appended to X-Forwarded-For, for trusted_hops
    sends_proxy_protocol: bool = False
    sender: str = ""  # who hands the connection to this hop; empty for a client connecting directly
    lost_at: str = ""  # the hop that lost the address, when `how` is None
    encrypted: bool = False  # the bytes arriving are TLS: X-Forwarded-For in them is out of reach


@dataclass(eq=False)
class _Node:
    """A hop evaluated under one arrival, a backend, or a loop; shared by every path through it."""

    where: str
    text: str  # may contain SENDER_HOPS
    kept: bool
    outcome: bool
    findings: list[Finding] = field(default_factory=list)
    next: list[_Node] = field(default_factory=list)


def _name(proxy: Proxy, listener: Listener) -> str:
    return f"{proxy.name}/{listener.name}"


def _names(names: list[str]) -> str:
    """Up to three names in full; a fleet as its first two and a count."""
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]}, {names[1]} and {len(names) - 2} more"


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


class Walker:
    """Walks a topology's paths hop by hop, evaluating each (listener, arrival) once.

    `hop_evaluations` counts those evaluations: at most listeners x distinct arrivals, however
    many paths run through them.
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.index = _listener_index(topology)
        self.hop_evaluations = 0
        self._hops: dict[tuple[str, _Arrival], _Node] = {}
        self._outcomes: dict[tuple[str, str, bool], _Node] = {}
        self._on_path: set[str] = set()

    def explain(self, start: str | None = None) -> list[Path]:
        """Every start's paths: the entry listeners, or `start` ('proxy/listener' or a listener name)."""
        if start is None:
            starts = entry_listeners(self.topology)
        else:
            starts = [
                (proxy, listener)
                for proxy in self.topology.proxies.values()
                for listener in proxy.listeners
                if start in (listener.name, _name(proxy, listener))
            ]
            if not starts:
                names = ", ".join(_name(p, lst) for p in self.topology.proxies.values() for lst in p.listeners)
                raise KeyError(f"no listener '{start}'; listeners: {names}")
        return [self.walk(proxy, listener) for proxy, listener in starts]

    def walk(self, proxy: Proxy, listener: Listener) -> Path:
        # A client speaks what the listener expects: TLS to a terminating or passthrough listener.
        encrypted = listener.tls is not None or listener.passes_tls_through
        if listener.accept_proxy_protocol is not None:
            arrival = _Arrival("PROXY protocol header from the load balancer in front", sends_proxy_protocol=True,
                               sender="the load balancer in front", encrypted=encrypted)
        else:
            arrival = _Arrival("the client connects directly: it is the peer", encrypted=encrypted)
        return _summarize(_name(proxy, listener), self._hop(proxy, listener, arrival))

    def _hop(self, proxy: Proxy, listener: Listener, arrival: _Arrival) -> _Node:
        where = _name(proxy, listener)
        if where in self._on_path:
            # Judged on the path that first reached this hop; a later path through the memoized
            # hops may meet the same cycle at another of its listeners, which is the same loop.
            return self._outcome(where, "loops back to a listener already on this path; stopping", kept=False)
        key = (where, arrival)
        node = self._hops.get(key)
        if node is None:
            self.hop_evaluations += 1
            self._on_path.add(where)
            try:
                node = self._hops[key] = self._evaluate(proxy, listener, arrival)
            finally:
                self._on_path.discard(where)
        return node

    def _evaluate(self, proxy: Proxy, listener: Listener, arrival: _Arrival) -> _Node:
        where = _name(proxy, listener)
        findings: list[Finding] = []
        arrival = self._check_acceptance(findings, where, listener, arrival)
        if arrival.how is not None:
            text = f"client address: {arrival.how}"
            if listener.tls is not None:
                text += "; TLS terminated here, so X-Forwarded-For is readable (and appended) again"
            elif listener.passes_tls_through:
                text += "; TLS passes through by SNI, still encrypted"
        elif arrival.lost_at == where:
            text = "client address lost here"
        else:
            text = f"client address already lost at {arrival.lost_at}"
        self._check_rules(findings, where, listener, arrival)
        node = _Node(where, text, kept=arrival.how is not None, outcome=False, findings=findings)
        for service_name in listener.services():
            service = self.topology.services[service_name]
            self._check_sticky(findings, where, service, arrival)
            outgoing = self._outgoing(findings, proxy, listener, service, arrival)
            backends = []
            for endpoint in service.endpoints:
                target = self.index.get(endpoint)
                if target is not None:
                    node.next.append(self._hop(target[0], target[1], outgoing))
                else:
                    backends.append(endpoint)
            if backends:
                node.next.append(self._backend(service, backends, outgoing))
        return node

    def _outcome(self, where: str, text: str, kept: bool) -> _Node:
        key = (where, text, kept)
        node = self._outcomes.get(key)
        if node is None:
            node = self._outcomes[key] = _Node(where, text, kept, outcome=True)
        return node

    # -- what arrives, and whether the listener reads it -----------------------------------------
    def _check_acceptance(self, findings: list[Finding], where: str, listener: Listener,
                          arrival: _Arrival) -> _Arrival:
        accepts = listener.accept_proxy_protocol is not None
        # A mismatch breaks the connection even when the address was lost before; the loss stays
        # blamed on the hop that lost it first.
        lost_at = arrival.lost_at or where
        if arrival.sends_proxy_protocol and not accepts:
            findings.append(Finding(
                Severity.LOST, where,
                f"{arrival.sender} sends a PROXY protocol header but this listener does not accept one: "
                "the header reaches the application as garbage",
                f"set accept_proxy_protocol: true on {where}, or stop sending it",
            ))
            return _Arrival(None, lost_at=lost_at)
        if accepts and not arrival.sends_proxy_protocol and arrival.sender:
            optional = listener.accept_proxy_protocol is not None and listener.accept_proxy_protocol.optional
            consequence = ("connections without it pass, but the address they carry is the sender's"
                           if optional else "Envoy waits for a header that never comes and drops the connection")
            findings.append(Finding(
                Severity.LOST, where,
                f"this listener expects a PROXY protocol header but {arrival.sender} does not send one: {consequence}",
                f"set send_proxy_protocol: v2 on {arrival.sender}, or drop accept_proxy_protocol",
            ))
            return _Arrival(None, lost_at=lost_at)
        if arrival.sender and listener.protocol is Protocol.HTTP and arrival.encrypted != (listener.tls is not None):
            findings.append(self._tls_mismatch(where, listener, arrival))
            return _Arrival(None, lost_at=lost_at)
        if arrival.how is None:
            return arrival
        if listener.protocol is Protocol.HTTP and arrival.xff_appenders:
            self._check_trusted_hops(findings, where, listener, arrival)
        return arrival

    @staticmethod
    def _tls_mismatch(where: str, listener: Listener, arrival: _Arrival) -> Finding:
        if arrival.encrypted:
            return Finding(
                Severity.LOST, where,
                f"{arrival.sender} sends TLS but this http listener does not terminate it: no request can be read",
                f"add tls: {{certificates: [...]}} to {where}, or remove tls from the service",
            )
        return Finding(
            Severity.LOST, where,
            f"this listener terminates TLS but {arrival.sender} sends plain text: every handshake fails",
            f"add tls: {{ca: ...}} to the service, or remove tls from {where}",
        )

    def _check_trusted_hops(self, findings: list[Finding], where: str, listener: Listener,
                            arrival: _Arrival) -> None:
        trusted = listener.xff.trusted_hops if listener.xff is not None else 0
        use_remote = listener.xff is not None and listener.xff.use_remote_address
        expected = arrival.xff_appenders
        if not use_remote:
            findings.append(Finding(
                Severity.WARNING, where,
                "use_remote_address is off: Envoy takes the client from the rightmost X-Forwarded-For entry, "
                "and no rule here can tell a forged header from a proxy's",
                f"set xff: {{use_remote_address: true, trusted_hops: {expected}}}",
            ))
        elif trusted > expected:
            findings.append(Finding(
                Severity.LOST, where,
                f"xff.trusted_hops is {trusted} but only {expected} prox{'y' if expected == 1 else 'ies'} in front "
                "append to X-Forwarded-For: an address the client wrote itself is trusted",
                f"set xff.trusted_hops: {expected}",
            ))
        elif trusted < expected:
            findings.append(Finding(
                Severity.LOST, where,
                f"xff.trusted_hops is {trusted} but {expected} prox{'y' if expected == 1 else 'ies'} in front "
                "append to X-Forwarded-For: the address taken as the client is a proxy's",
                f"set xff.trusted_hops: {expected}",
            ))

    def _check_rules(self, findings: list[Finding], where: str, listener: Listener, arrival: _Arrival) -> None:
        rules = [f"{key} {', '.join(map(str, networks))}"
                 for key, networks in (("allow_from", listener.allow_from), ("deny_from", listener.deny_from))
                 if networks]
        # match: direct_peer means the proxy's address on purpose.
        if rules and listener.match is PeerMatch.CLIENT and arrival.how is None:
            findings.append(Finding(
                Severity.LOST, where,
                f"{' and '.join(rules)} here would match a proxy's address, not the client's: "
                f"the client address is lost at {arrival.lost_at}",
                f"carry the client address to {where}: fix the loss at {arrival.lost_at} (see its finding)",
            ))

    def _check_sticky(self, findings: list[Finding], where: str, service: Service, arrival: _Arrival) -> None:
        if service.sticky is not None and arrival.how is None:
            findings.append(Finding(
                Severity.LOST, service.name,
                f"sticky: client_ip on '{service.name}' hashes a proxy's address at {where}: "
                f"every client lands on the same backend; the client address is lost at {arrival.lost_at}",
                f"carry the client address to {where}: fix the loss at {arrival.lost_at} (see its finding)",
            ))

    # -- how this hop hands the address on ---------------------------------------------------------
    def _outgoing(self, findings: list[Finding], proxy: Proxy, listener: Listener, service: Service,
                  arrival: _Arrival) -> _Arrival:
        where = _name(proxy, listener)
        pp = service.send_proxy_protocol
        if listener.original_src is not None and pp is not None:
            findings.append(Finding(
                Severity.WARNING, where,
                f"original_src and send_proxy_protocol (service '{service.name}') on one path: both work, but Envoy "
                "keeps one upstream connection pool per client address",
                "keep one of the two unless the next hop needs both",
            ))
        sends_pp = pp is not None
        sender = f"service '{service.name}'"
        # TLS leaves this hop when the service speaks it, or when a tcp hop forwards TLS it was given.
        encrypted = service.tls is not None or (listener.protocol is Protocol.TCP and arrival.encrypted)
        if arrival.how is None:
            return _Arrival(None, sends_proxy_protocol=sends_pp, sender=sender, lost_at=arrival.lost_at,
                            encrypted=encrypted)
        if listener.original_src is not None and self._original_src_ok(findings, proxy, listener, service):
            how = f"original_src: {SENDER_HOPS} connects from the client's own IP (mark {listener.original_src.mark})"
            return _Arrival(how, sends_proxy_protocol=sends_pp, sender=sender, encrypted=encrypted)
        if sends_pp:
            return _Arrival(f"PROXY protocol {pp} header sent by {SENDER_HOPS} ({sender})",
                            sends_proxy_protocol=True, sender=sender, encrypted=encrypted)
        if listener.protocol is Protocol.HTTP and listener.xff is not None and listener.xff.use_remote_address \
                and not listener.xff.skip_append:
            return _Arrival(f"X-Forwarded-For, appended by {SENDER_HOPS}", xff_appenders=arrival.xff_appenders + 1,
                            sender=sender, encrypted=encrypted)
        if listener.protocol is Protocol.HTTP and arrival.xff_appenders:
            # Envoy passes X-Forwarded-For on unchanged: the next hop sees the same appenders.
            return _Arrival(f"X-Forwarded-For, passed on unchanged by {SENDER_HOPS}",
                            xff_appenders=arrival.xff_appenders, sender=sender, encrypted=encrypted)
        if listener.original_src is None:  # a broken original_src has a finding of its own
            self._report_dropped(findings, where, listener, service)
        return _Arrival(None, sender=sender, lost_at=where, encrypted=encrypted)

    def _report_dropped(self, findings: list[Finding], where: str, listener: Listener, service: Service) -> None:
        """The address arrives here and nothing hands it on to `service`: this hop is the one to blame."""
        # A next hop that expects a PROXY header reports the mismatch (and its fix) itself.
        unreported = [ep for ep in service.endpoints
                      if ep not in self.index or self.index[ep][1].accept_proxy_protocol is None]
        if not unreported:
            return
        next_hops = [_name(*self.index[ep]) for ep in unreported if ep in self.index]
        send_pp = f"send_proxy_protocol: v2 on service '{service.name}'"
        if next_hops:
            send_pp += f" and accept_proxy_protocol: true on {_names(next_hops)}"
        if len(next_hops) < len(unreported):
            send_pp += " (if the backend reads PROXY protocol)"
        fixes = [send_pp, f"original_src (with a placement) on {where}"]
        why = ""
        if listener.protocol is Protocol.TCP and listener.passes_tls_through:
            # The one header an HTTP hop could add is inside the client's encryption here.
            why = ": TLS passes through this hop encrypted, so X-Forwarded-For cannot carry it; only PROXY" \
                  " protocol or original_src can"
        if listener.protocol is Protocol.HTTP:
            if listener.xff is not None and listener.xff.use_remote_address:
                fixes.append(f"xff.skip_append: false on {where}")
            else:
                fixes.append(f"xff: {{use_remote_address: true}} on {where}")
        findings.append(Finding(
            Severity.LOST, where,
            f"nothing carries the client address from {where} to '{service.name}' "
            f"({', '.join(map(str, unreported))}){why}",
            "set " + ", or ".join(fixes),
        ))

    def _original_src_ok(self, findings: list[Finding], proxy: Proxy, listener: Listener, service: Service) -> bool:
        where = _name(proxy, listener)
        original_src = listener.original_src
        assert original_src is not None
        if original_src.placement is None:
            findings.append(Finding(
                Severity.LOST, where,
                "original_src without a placement: the upstream's replies must be routed back through this host, "
                "and `keepsrc netplan` cannot tell how",
                "set original_src.placement: local (upstream on this host) or gateway (with upstream_interface)",
            ))
            return False
        remote = [ep for ep in service.endpoints if not _is_local(ep.host, proxy)]
        if original_src.placement is Placement.LOCAL and remote:
            findings.append(Finding(
                Severity.LOST, where,
                f"original_src with placement local, but '{service.name}' has endpoints on other hosts "
                f"({', '.join(map(str, remote))}): their replies go to the client, not back through Envoy",
                f"set original_src: {{placement: gateway, upstream_interface: <interface towards {remote[0].host}>}}",
            ))
            return False
        return True

    def _backend(self, service: Service, endpoints: list[SocketAddress], arrival: _Arrival) -> _Node:
        where = f"{service.name} {', '.join(map(str, endpoints))}"
        if arrival.how is None:
            return self._outcome(where, f"backend sees a proxy's address, not the client's (lost at {arrival.lost_at})",
                                 kept=False)
        if arrival.sends_proxy_protocol:
            reads = "the backend must read the PROXY protocol header (e.g. nginx `listen ... proxy_protocol`)"
        elif arrival.xff_appenders:
            reads = "the backend reads X-Forwarded-For"
        else:
            reads = "the backend sees the client as its peer (TCP connection or UDP source)"
        return self._outcome(where, f"{arrival.how}; {reads}", kept=True)


def _summarize(start: str, root: _Node) -> Path:
    """The paths from `root`, counted and merged over the (acyclic) graph of evaluated hops."""
    preds: dict[_Node, list[_Node]] = {root: []}  # one entry per edge: two edges are two paths
    preorder = [root]
    postorder: list[_Node] = []
    stack = [(root, iter(root.next))]
    while stack:
        node, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            postorder.append(node)
        elif child in preds:
            preds[child].append(node)
        else:
            preds[child] = [node]
            preorder.append(child)
            stack.append((child, iter(child.next)))

    def loses(node: _Node) -> bool:
        return any(f.severity is Severity.LOST for f in node.findings)

    # In topological order: a step's layer is its longest distance from the start, and `through`
    # counts the paths reaching it, `clean` those that met no LOST finding on the way.
    layer, through, clean = {root: 0}, {root: 1}, {root: 0 if loses(root) else 1}
    for node in reversed(postorder[:-1]):
        layer[node] = 1 + max(layer[p] for p in preds[node])
        through[node] = sum(through[p] for p in preds[node])
        clean[node] = 0 if loses(node) else sum(clean[p] for p in preds[node])

    rank = {node: i for i, node in enumerate(preorder)}
    groups: dict[tuple[int, bool, bool, str, str], list[_Node]] = {}
    for node in sorted(preorder, key=lambda n: (layer[n], rank[n])):
        text = node.text.replace(SENDER_HOPS, _names(list(dict.fromkeys(p.where for p in preds[node]))))
        # Hops in one layer that fare the same share a line; outcomes only with their own backend.
        key = (layer[node], node.outcome, node.kept, text, node.where if node.outcome else "")
        groups.setdefault(key, []).append(node)
    steps = [
        Step(_names(list(dict.fromkeys(n.where for n in nodes))), text, kept, sum(through[n] for n in nodes), outcome)
        for (_, outcome, kept, text, _), nodes in groups.items()
    ]
    findings = dict.fromkeys(f for nodes in groups.values() for n in nodes for f in n.findings)
    ends = [n for n in preorder if not n.next]
    paths = sum(through[n] for n in ends)
    return Path(start, steps, list(findings), paths, lost_paths=paths - sum(clean[n] for n in ends))


def explain(topology: Topology, start: str | None = None) -> list[Path]:
    """Every path from the entry listeners (or from `start`: 'proxy/listener' or a listener name)."""
    return Walker(topology).explain(start)


def render_text(paths: list[Path]) -> str:
    lines = []
    for path in paths:
        if path.paths == 1:
            lines.append(f"{path.start}: {'LOST' if path.lost else 'kept'}")
        elif path.lost:
            lines.append(f"{path.start}: LOST on {path.lost_paths:,} of {path.paths:,} paths")
        else:
            lines.append(f"{path.start}: kept on all {path.paths:,} paths")
        for step in path.steps:
            count = f" ({step.paths:,} path{'' if step.paths == 1 else 's'})" if step.outcome and path.paths > 1 else ""
            lines.append(f"  {'ok  ' if step.kept else 'LOST'} {step.where}: {step.text}{count}")
        for finding in path.findings:
            lines.append(f"  {finding.severity.value.upper()}: {finding.where}: {finding.message}")
            lines.append(f"      fix: {finding.fix}")
    return "\n".join(lines) + "\n"


def to_json(paths: list[Path]) -> list[dict[str, object]]:
    return [
        {
            "start": p.start,
            "kept": not p.lost,
            "paths": p.paths,
            "lost_paths": p.lost_paths,
            "steps": [{"where": s.where, "kept": s.kept, "text": s.text, "paths": s.paths, "outcome": s.outcome}
                      for s in p.steps],
            "findings": [
                {"severity": f.severity.value, "where": f.where, "message": f.message, "fix": f.fix}
                for f in p.findings
            ],
        }
        for p in paths
    ]
