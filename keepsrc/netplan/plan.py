"""Topology + node -> the host plan that makes original_src work (pure: no I/O).

Envoy's original_src filter connects upstream from the client's own address (IP_TRANSPARENT)
and marks that socket's packets with `mark`. The upstream then replies *to the client's
address*; unless the host steers those replies back into its own stack they leave towards the
real client, which drops them, and the connection never opens. The plan per placement:

local (the talk, a sidecar: the upstream app runs in this network namespace)
    Envoy's marked SYN loops through lo and enters PREROUTING still marked: save the mark on the
    connection there. The app's replies are locally generated: restore the mark in OUTPUT, and
    `ip rule fwmark M lookup T` + `local default dev lo table T` deliver them back to Envoy.
    Replies from an app on 127/8 are routed to a non-local address first, which the kernel only
    allows with route_localnet (measured: without it the backend's SYN-ACK is dropped).

gateway (the upstream is another host whose route to clients goes through this host)
    The talk's rules break here: Envoy's marked SYN never loops through PREROUTING (it leaves on
    the wire), so nothing saves the mark, and an `ip rule fwmark M` without `iif` would catch the
    SYN itself and deliver it to lo. Measured working set: save the mark in OUTPUT (Envoy's own
    packets), restore it in PREROUTING on the upstream interface (the replies), and scope the ip
    rule with `iif <upstream_interface>` so only arriving replies are sent to lo.

udp listeners (udp_proxy's use_original_src_ip)
    Envoy sends each session's datagrams from an unconnected IP_TRANSPARENT socket, with the
    client's IP as source (IP_PKTINFO) and an ephemeral port, but sets *no* mark, so there is no
    mark to save. What tells those datagrams apart in OUTPUT is a non-local source address
    (only a transparent socket can send one) and the upstream's own address: that rule sets the
    connection's mark itself. The reply then follows the same path as TCP's: restored in OUTPUT
    (local) or in PREROUTING on the upstream interface (gateway), `ip rule fwmark` -> table ->
    lo, where the destination client-IP:port finds Envoy's socket (it is bound to the wildcard
    address). Measured with Envoy 1.40 in namespaces, IPv4 local and gateway, IPv6 gateway. The
    rules name the upstream endpoints, so a udp listener's service needs IP endpoints, and the
    plan must be re-applied when they change.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from keepsrc.topology.model import Listener, OriginalSrc, Placement, Protocol, SocketAddress, Topology

CHAIN_PREROUTING = "KEEPSRC-PREROUTING"
CHAIN_OUTPUT = "KEEPSRC-OUTPUT"
# Built-in mangle chain -> keepsrc chain it jumps to; every jump carries this comment.
JUMPS = (("PREROUTING", CHAIN_PREROUTING), ("OUTPUT", CHAIN_OUTPUT))
JUMP_COMMENT = "keepsrc"
# Protocol number on keepsrc's ip rules and routes (unassigned in iproute2's rt_protos): it makes
# them recognisable, so apply and remove touch only keepsrc's own and never an identical rule
# another tool (e.g. Istio) installed.
RT_PROTO = 107
ROUTE_LOCALNET = "net.ipv4.conf.all.route_localnet"
# The value `--remove` puts back when keepsrc's record of a sysctl's prior value is gone (a mangle
# flush or an older ruleset restored takes the record with it): the kernel default, which is also
# the safe one (route_localnet=1 without the 127/8 guard exposes 127/8 to the network).
SAFE_SYSCTLS = {ROUTE_LOCALNET: "0"}
_FULL_MASK = "--nfmask 0xffffffff --ctmask 0xffffffff"


class PlanError(Exception):
    """The topology does not say enough (or says contradictory things) to plan this node."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems  # (key path, message)
        super().__init__("\n".join(f"{path}: {message}" for path, message in problems))


@dataclass(frozen=True)
class MarkSet:
    """One rule set: listeners sharing mark, table, placement and upstream interface share it."""

    mark: int
    table: int
    placement: Placement
    upstream_interface: str | None
    listeners: tuple[str, ...]
    tcp: bool  # a tcp or http listener is in the set: Envoy marks its upstream sockets itself
    udp_upstreams: tuple[SocketAddress, ...]  # the udp listeners' endpoints: their datagrams carry no mark


@dataclass(frozen=True)
class IpRule:
    family: int  # 4 or 6
    mark: int
    table: int
    iif: str | None

    def args(self) -> tuple[str, ...]:
        iif = ("iif", self.iif) if self.iif else ()
        return ("fwmark", f"{self.mark:#x}", *iif, "lookup", str(self.table), "protocol", str(RT_PROTO))


@dataclass(frozen=True)
class IpRoute:
    family: int  # 4 or 6
    table: int

    def args(self) -> tuple[str, ...]:
        return ("local", "default", "dev", "lo", "table", str(self.table), "protocol", str(RT_PROTO))


@dataclass(frozen=True)
class Sysctl:
    key: str  # dotted, as `sysctl` spells it
    value: str

    @property
    def proc_path(self) -> str:
        return "/proc/sys/" + self.key.replace(".", "/")


@dataclass(frozen=True)
class MangleRules:
    """keepsrc's chains of one family's mangle table: (chain, rule specs) in order."""

    chains: tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class NetPlan:
    node: str
    mark_sets: tuple[MarkSet, ...]
    mangle4: MangleRules
    mangle6: MangleRules
    rules: tuple[IpRule, ...]
    routes: tuple[IpRoute, ...]
    sysctls: tuple[Sysctl, ...]

    @property
    def empty(self) -> bool:
        return not self.mark_sets


def _save_mark(mark: int, where: str) -> str:
    return (f'-p tcp -m mark --mark {mark:#x} -m comment --comment "keepsrc: {where}"'
            f" -j CONNMARK --save-mark {_FULL_MASK}")


def _restore_mark(mark: int, where: str, iface: str | None = None, protocol: str = "tcp") -> str:
    match_in = f"-i {iface} " if iface else ""
    return (f'{match_in}-p {protocol} -m connmark --mark {mark:#x} -m comment --comment "keepsrc: {where}"'
            f" -j CONNMARK --restore-mark {_FULL_MASK}")


def _mark_datagrams(mark: int, upstream: SocketAddress) -> str:
    """Envoy's udp_proxy datagrams to `upstream`: sent from a client's address, which no socket
    but a transparent one can do, so `! --src-type LOCAL` tells them from the host's own."""
    network = ipaddress.ip_network(upstream.host)
    # Written as iptables-save prints it, so the applied rule reads the same as the plan.
    return (f"-d {network} -p udp -m udp --dport {upstream.port} -m addrtype ! --src-type LOCAL"
            f' -m comment --comment "keepsrc: Envoy\'s udp datagram from a client\'s address (udp_proxy sets'
            f' no mark); mark {mark} the session" -j CONNMARK --set-xmark {mark:#x}/0xffffffff')


# route_localnet also lets packets from the wire reach 127/8 (the kube-proxy CVE-2020-8558
# problem); nothing legitimate arrives for 127/8 on a non-loopback interface, so drop it.
LOCALNET_GUARD = ('! -i lo -d 127.0.0.0/8 -m comment --comment "keepsrc: route_localnet is on;'
                   ' keep 127/8 unreachable from the network" -j DROP')


def _listener_problems(path: str, listener: Listener, original_src: OriginalSrc) -> list[tuple[str, str]]:
    where = f"listener '{listener.name}'"
    if original_src.placement is None:
        return [(f"{path}.original_src.placement",
                 f"{where} has original_src without a placement, and netplan will not guess where its"
                 " upstream lives. Add `original_src.placement: local` if the upstream app runs on this"
                 " host (same network namespace, as a sidecar), or `original_src.placement: gateway` plus"
                 " `original_src.upstream_interface: <interface the upstream's replies arrive on>` if the"
                 " upstream is another host routed through this one")]
    if original_src.placement is Placement.GATEWAY and not original_src.upstream_interface:
        return [(f"{path}.original_src.upstream_interface",
                 f"{where} has placement gateway but no upstream_interface; add"
                 " `original_src.upstream_interface: <interface the upstream's replies arrive on>`: only"
                 " replies arriving there may be sent back to Envoy, or Envoy's own SYN loops to lo")]
    return []


def _udp_upstreams(topology: Topology, listener: Listener) -> tuple[list[SocketAddress], list[tuple[str, str]]]:
    """A udp listener's endpoints, which its rules must name; a DNS name is a problem."""
    upstreams: list[SocketAddress] = []
    problems: list[tuple[str, str]] = []
    for name in listener.services():
        service = topology.services.get(name)
        for j, endpoint in enumerate(service.endpoints if service else ()):
            try:
                ipaddress.ip_address(endpoint.host)
            except ValueError:
                problems.append((f"services.{name}.endpoints[{j}]",
                                 f"listener '{listener.name}' is udp with original_src: Envoy's udp_proxy sets no"
                                 " mark, so netplan recognises its upstream datagrams by the upstream's address,"
                                 f" which must be an IP; '{endpoint.host}' is a DNS name (write its IP here)"))
                continue
            upstreams.append(endpoint)
    return upstreams, problems


def _uses_loopback(topology: Topology, listener: Listener) -> bool:
    for name in listener.services():
        service = topology.services.get(name)
        for endpoint in service.endpoints if service else ():
            try:
                if ipaddress.ip_address(endpoint.host) in ipaddress.ip_network("127.0.0.0/8"):
                    return True
            except ValueError:  # a DNS name: it cannot be judged here, and is rarely loopback
                continue
    return False


def needs_route_localnet(topology: Topology, node: str) -> bool:
    """Whether proxy `node`'s plan sets route_localnet (and so its 127/8 guard): an original_src
    listener with placement local whose upstream is on 127/8. Never raises for an unclear listener."""
    proxy = topology.proxies.get(node)
    return proxy is not None and any(
        listener.original_src is not None and listener.original_src.placement is Placement.LOCAL
        and _uses_loopback(topology, listener) for listener in proxy.listeners)


def plan_for(topology: Topology, node: str) -> NetPlan:
    """The host plan for proxy `node`; raises KeyError for an unknown node, PlanError when unsure."""
    proxy = topology.proxies[node]
    problems: list[tuple[str, str]] = []
    sets: dict[tuple[int, int, Placement, str | None], list[str]] = {}
    tcp_sets: set[tuple[int, int, Placement, str | None]] = set()
    udp_upstreams: dict[tuple[int, int, Placement, str | None], list[SocketAddress]] = {}
    placements_by_mark: dict[int, dict[Placement, str]] = {}
    localnet = False
    for i, listener in enumerate(proxy.listeners):
        original_src = listener.original_src
        if original_src is None:
            continue
        path = f"proxies.{node}.listeners[{i}]"
        found = _listener_problems(path, listener, original_src)
        upstreams: list[SocketAddress] = []
        if listener.protocol is Protocol.UDP:
            upstreams, unnamed = _udp_upstreams(topology, listener)
            found += unnamed
        if found:
            problems += found
            continue
        assert original_src.placement is not None
        iface = original_src.upstream_interface if original_src.placement is Placement.GATEWAY else None
        key = (original_src.mark, original_src.table, original_src.placement, iface)
        sets.setdefault(key, []).append(listener.name)
        if listener.protocol is Protocol.UDP:
            udp_upstreams.setdefault(key, []).extend(upstreams)
        else:
            tcp_sets.add(key)
        seen = placements_by_mark.setdefault(original_src.mark, {})
        seen.setdefault(original_src.placement, listener.name)
        if len(seen) > 1:
            # A local set's `ip rule fwmark M` has no iif (its replies are locally generated), so it
            # would also catch the gateway listener's outgoing SYNs and loop them to lo.
            problems.append((f"{path}.original_src.mark",
                             f"listeners '{seen[Placement.LOCAL]}' (local) and '{seen[Placement.GATEWAY]}'"
                             f" (gateway) share mark {original_src.mark}: the local rule would also catch"
                             " the gateway listener's upstream SYNs; give one of them another"
                             " `original_src.mark`"))
        localnet = localnet or (original_src.placement is Placement.LOCAL and _uses_loopback(topology, listener))
    if problems:
        raise PlanError(problems)

    mark_sets = tuple(MarkSet(m, t, p, i, tuple(names), (m, t, p, i) in tcp_sets,
                              tuple(dict.fromkeys(udp_upstreams.get((m, t, p, i), ()))))
                      for (m, t, p, i), names in sets.items())
    prerouting: dict[int, list[str]] = {4: [LOCALNET_GUARD] if localnet else [], 6: []}
    output: dict[int, list[str]] = {4: [], 6: []}
    rules: list[IpRule] = []
    for s in mark_sets:
        if s.tcp:
            for family in (4, 6):
                if s.placement is Placement.LOCAL:
                    prerouting[family].append(_save_mark(s.mark, "Envoy's upstream SYN came back through lo;"
                                                                 f" mark {s.mark} the connection"))
                    output[family].append(_restore_mark(s.mark, f"local upstream's reply; table {s.table} returns"
                                                                " it to Envoy"))
                else:
                    output[family].append(_save_mark(s.mark, f"Envoy's upstream SYN; mark {s.mark} the connection"))
                    prerouting[family].append(_restore_mark(s.mark, f"upstream's reply on {s.upstream_interface};"
                                                                    f" table {s.table} returns it to Envoy",
                                                            s.upstream_interface))
        for family in (4, 6):
            upstreams = [u for u in s.udp_upstreams if u.is_ipv6 == (family == 6)]
            if not upstreams:
                continue
            output[family] += [_mark_datagrams(s.mark, u) for u in upstreams]
            if s.placement is Placement.LOCAL:
                # After the marking rule: the app's reply (locally generated) takes the mark here.
                output[family].append(_restore_mark(s.mark, f"local upstream's reply datagram; table {s.table}"
                                                            " returns it to Envoy", protocol="udp"))
            else:
                prerouting[family].append(_restore_mark(s.mark, f"upstream's reply datagram on"
                                                                f" {s.upstream_interface}; table {s.table} returns"
                                                                " it to Envoy", s.upstream_interface, "udp"))
        rules += [IpRule(family, s.mark, s.table, s.upstream_interface) for family in (4, 6)]
    tables = dict.fromkeys(s.table for s in mark_sets)
    routes = tuple(IpRoute(family, table) for table in tables for family in (4, 6))

    def mangle(family: int) -> MangleRules:
        if not mark_sets:
            return MangleRules(())
        return MangleRules(((CHAIN_PREROUTING, tuple(prerouting[family])),
                            (CHAIN_OUTPUT, tuple(output[family]))))

    return NetPlan(
        node=node,
        mark_sets=mark_sets,
        mangle4=mangle(4),
        mangle6=mangle(6),
        rules=tuple(dict.fromkeys(rules)),
        routes=routes,
        sysctls=(Sysctl(ROUTE_LOCALNET, "1"),) if localnet else (),
    )


def jump_spec(chain: str, target: str) -> str:
    return f"{chain} -m comment --comment {JUMP_COMMENT} -j {target}"


def restore_text(mangle: MangleRules, jumps: tuple[tuple[str, str], ...] = JUMPS,
                 extra_chains: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> str:
    """iptables-restore --noflush input: declaring a chain that exists flushes it, so the chain
    bodies are replaced, not appended to; `jumps` are inserted first in their built-in chains."""
    chains = mangle.chains + extra_chains
    lines = ["*mangle"]
    lines += [f":{name} - [0:0]" for name, _ in chains]
    lines += [f"-A {name} {spec}" for name, specs in chains for spec in specs]
    lines += [f"-I {chain} 1 -m comment --comment {JUMP_COMMENT} -j {target}" for chain, target in jumps]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render(plan: NetPlan, file: str) -> str:
    """The plan as a person reads it: iptables-restore input plus the ip and sysctl commands."""
    if plan.empty:
        return f"# keepsrc netplan: node '{plan.node}' in {file} has no original_src listener; nothing to do\n"
    out = [f"# keepsrc netplan for node '{plan.node}' ({file})"]
    for s in plan.mark_sets:
        where = ("the upstream app runs in this network namespace" if s.placement is Placement.LOCAL
                 else f"the upstream is another host; its replies arrive on {s.upstream_interface}")
        out.append(f"# mark {s.mark} ({s.mark:#x}), table {s.table}, placement {s.placement}: {where}"
                   f" (listeners: {', '.join(s.listeners)})")
        if s.udp_upstreams:
            out.append("#   udp: Envoy's udp_proxy sets no mark; its datagrams are recognised by their client source"
                       f" and the upstream ({', '.join(map(str, s.udp_upstreams))}): re-apply when those change")
            out.append("#   udp: the upstream can send first (e.g. a SIP BYE) only while conntrack keeps the session:"
                       " raise net.netfilter.nf_conntrack_udp_timeout{,_stream} (30s/120s) above the longest silence")
    out.append("# `keepsrc netplan --apply` applies this idempotently; `--remove` undoes it exactly.")
    out.append("")
    out.append("# IPv4 mangle table: iptables-restore --noflush")
    out.append(restore_text(plan.mangle4))
    out.append("# IPv6 mangle table: ip6tables-restore --noflush")
    out.append(restore_text(plan.mangle6))
    out.append(f"# policy routing: marked replies -> table -> lo (protocol {RT_PROTO} tags keepsrc's own)")
    out += [f"ip -{r.family} rule add {' '.join(r.args())}" for r in plan.rules]
    out += [f"ip -{r.family} route add {' '.join(r.args())}" for r in plan.routes]
    if plan.sysctls:
        out.append("")
        out.append("# an upstream on 127/8 replies from a loopback source to a remote address; allow that routing")
        out += [f"sysctl -w {s.key}={s.value}" for s in plan.sysctls]
    return "\n".join(out) + "\n"
