"""Is the plan still in place? `keepsrc netplan --check`, and `host_findings()` for the server.

route_localnet=1 (set for an upstream on 127/8) lets packets from the network reach 127/8 unless
the plan's guard drops them (CVE-2020-8558 is this exposure in Kubernetes), and the two live in
different places: a mangle flush (`iptables -t mangle -F`) or an `iptables-restore` of an older
ruleset takes the guard (and keepsrc's state record) away and leaves the sysctl on. `--check`
compares the namespace with the plan item by item and names that case as the dangerous one.

Reading is separated from judging: `read_host()` does the I/O (iptables-save, ip -j, /proc/sys),
`check_plan()` and `localnet_findings()` are pure over what it read. Nothing here changes the host;
`iptables-save` runs bare (a `-t mangle` dump would create the table under iptables-nft).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from keepsrc.netplan.apply import (
    FAMILIES,
    STATE_CHAIN,
    ApplyError,
    _ip_json,
    _mangle_lines,
    _own_routes,
    _own_rules,
    _read_sysctl,
    _saved_sysctls,
    _state,
    record_intact,
)
from keepsrc.netplan.plan import (
    CHAIN_PREROUTING,
    JUMP_COMMENT,
    JUMPS,
    LOCALNET_GUARD,
    ROUTE_LOCALNET,
    SAFE_SYSCTLS,
    IpRoute,
    IpRule,
    NetPlan,
    needs_route_localnet,
)
from keepsrc.topology.model import Topology

Status = Literal["ok", "missing", "drifted", "extra"]
_OWN_CHAINS = (*(target for _, target in JUMPS), STATE_CHAIN)
_CONF = Path("/proc/sys/net/ipv4/conf")
CVE = "CVE-2020-8558"


@dataclass(frozen=True)
class Item:
    status: Status
    what: str


@dataclass(frozen=True)
class HostState:
    """What --check compares, read once from the current network namespace."""

    mangle: dict[int, list[str] | None]  # family -> the mangle table's iptables-save lines (None: no table)
    own_rules: dict[int, list[IpRule]]  # family -> keepsrc's ip rules (protocol RT_PROTO)
    own_routes: dict[int, list[IpRoute]]  # family -> keepsrc's `local default dev lo` routes
    local_tables: dict[int, set[int]]  # family -> tables with a `local default dev lo` (anyone's)
    sysctls: dict[str, str]  # the keys the plan sets or keepsrc's record names
    route_localnet: dict[str, str]  # net.ipv4.conf.<name>.route_localnet ("default", a template, left out)


@dataclass(frozen=True)
class Report:
    node: str
    items: tuple[Item, ...]
    exposed: tuple[str, ...]  # route_localnet=1 on these (all / interfaces) while the 127/8 guard is not in effect

    @property
    def ok(self) -> bool:
        return not self.exposed and all(item.status == "ok" for item in self.items)


# -- rules as iptables-save prints them --------------------------------------------------------------
_GENERIC = {"-s": "-s", "--source": "-s", "-d": "-d", "--destination": "-d", "-i": "-i", "--in-interface": "-i",
            "-o": "-o", "--out-interface": "-o", "-p": "-p", "--protocol": "-p"}
Canonical = tuple[frozenset[tuple[str, ...]], tuple[str, ...]]


def canonical(spec: str) -> Canonical:
    """A rule spec in a form that compares equal however iptables-save prints it: it moves the
    generic matches (-s -d -i -o -p) to its own order and writes `'` in a comment as `\\'`."""
    try:
        tokens = shlex.split(spec.replace("\\'", "'"))
    except ValueError:
        return frozenset(), (spec,)
    generic: set[tuple[str, ...]] = set()
    rest: list[str] = []
    i = 0
    while i < len(tokens):
        negated = tokens[i] == "!" and i + 1 < len(tokens) and tokens[i + 1] in _GENERIC
        j = i + 1 if negated else i
        if tokens[j] in _GENERIC and j + 1 < len(tokens):
            generic.add(("!", _GENERIC[tokens[j]], tokens[j + 1]) if negated else (_GENERIC[tokens[j]], tokens[j + 1]))
            i = j + 2
        else:
            rest.append(tokens[i])
            i += 1
    return frozenset(generic), tuple(rest)


def _chains(lines: list[str] | None) -> dict[str, list[str]]:
    """Declared chain -> its rule specs, in order."""
    chains: dict[str, list[str]] = {line.split()[0][1:]: [] for line in lines or () if line.startswith(":")}
    for line in lines or ():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "-A":
            chains.setdefault(parts[1], []).append(parts[2])
    return chains


def _jump(target: str) -> str:
    return f"-m comment --comment {JUMP_COMMENT} -j {target}"


def guard_in_place(mangle4: list[str] | None) -> bool:
    """keepsrc's 127/8 guard is in the IPv4 mangle table and PREROUTING jumps to it."""
    chains = _chains(mangle4)
    return (canonical(LOCALNET_GUARD) in map(canonical, chains.get(CHAIN_PREROUTING, ()))
            and canonical(_jump(CHAIN_PREROUTING)) in map(canonical, chains.get("PREROUTING", ())))


# -- reading the host ------------------------------------------------------------------------------
def read_route_localnet() -> dict[str, str]:
    """route_localnet of `all` and of each interface (the kernel ORs the two)."""
    values: dict[str, str] = {}
    try:
        entries = sorted(_CONF.iterdir())
    except OSError:
        return values
    for entry in entries:
        if entry.name == "default":
            continue
        try:
            values[entry.name] = (entry / "route_localnet").read_text().strip()
        except OSError:
            continue
    return values


def _local_tables(version: int) -> set[int]:
    return {int(e["table"]) for e in _ip_json(f"-{version}", "route", "show", "table", "all", "type", "local")
            if e.get("dst") == "default" and e.get("dev") == "lo" and str(e.get("table", "")).isdigit()}


def read_host(plan: NetPlan) -> HostState:
    """The current namespace's side of every item of `plan` (raises ApplyError when a tool fails)."""
    mangle = {family.version: _mangle_lines(family) for family in FAMILIES}
    keys = [s.key for s in plan.sysctls] + list(_saved_sysctls(_state(mangle[4])))
    return HostState(
        mangle=mangle,
        own_rules={v: _own_rules(v) for v in (4, 6)},
        own_routes={v: _own_routes(v) for v in (4, 6)},
        local_tables={v: _local_tables(v) for v in (4, 6)},
        sysctls={key: _read_sysctl(key) for key in dict.fromkeys(keys)},
        route_localnet=read_route_localnet(),
    )


# -- judging ---------------------------------------------------------------------------------------
def _count_status(count: int) -> Status:
    return "missing" if count == 0 else "ok" if count == 1 else "drifted"


def _mangle_items(family: int, plan: NetPlan, lines: list[str] | None, traces: bool) -> list[Item]:
    mangle = plan.mangle4 if family == 4 else plan.mangle6
    chains = _chains(lines)
    items: list[Item] = []
    where = f"IPv{family} mangle"
    for chain, specs in mangle.chains:
        present = [canonical(spec) for spec in chains.get(chain, ())]
        wanted = {canonical(spec) for spec in specs}
        for spec in specs:
            label = "the 127/8 guard, " if spec == LOCALNET_GUARD else ""
            count = present.count(canonical(spec))
            note = f" ({count} copies)" if count > 1 else ""
            items.append(Item(_count_status(count), f"{where} {chain}: {label}{spec}{note}"))
        items += [Item("extra", f"{where} {chain}: {spec} (not in the plan)")
                  for spec in chains.get(chain, ()) if canonical(spec) not in wanted]
    planned = {chain for chain, _ in mangle.chains}
    items += [Item("extra", f"{where} chain {chain} (keepsrc's; not in the plan)")
              for chain in _OWN_CHAINS if chain in chains and chain not in planned and chain != STATE_CHAIN]
    for builtin, target in JUMPS:
        count = list(map(canonical, chains.get(builtin, ()))).count(canonical(_jump(target)))
        if mangle.chains:
            note = f" ({count} copies)" if count > 1 else ""
            items.append(Item(_count_status(count), f"{where} {builtin}: the jump to {target}{note}"))
        elif count:
            items.append(Item("extra", f"{where} {builtin}: the jump to {target} (not in the plan)"))
    if plan.empty:
        if STATE_CHAIN in chains:
            items.append(Item("extra", f"{where} chain {STATE_CHAIN} (keepsrc's record; not in the plan)"))
        return items
    facts = _state(lines)
    saved = _saved_sysctls(facts)
    unrecorded = [s.key for s in plan.sysctls if s.key not in saved] if family == 4 else []
    if STATE_CHAIN not in chains or not record_intact(facts):
        safe = ", ".join(f"{key}={SAFE_SYSCTLS[key]}" for key in unrecorded if key in SAFE_SYSCTLS)
        fallback = f"; --remove would restore the kernel default {safe}" if safe and traces else ""
        items.append(Item("missing", f"{where} {STATE_CHAIN}: keepsrc's record of what --apply changed{fallback}"))
    elif unrecorded:
        items.append(Item("drifted", f"{where} {STATE_CHAIN}: no value before --apply recorded for"
                                     f" {', '.join(unrecorded)}"))
    else:
        items.append(Item("ok", f"{where} {STATE_CHAIN}: keepsrc's record of what --apply changed"))
    return items


def check_plan(plan: NetPlan, host: HostState) -> Report:
    """Every item of `plan` against `host`: in place, missing, drifted, or keepsrc's but not planned."""
    # keepsrc was applied here (a record missing now was lost, not never written).
    traces = (any(chain in _chains(lines) for lines in host.mangle.values() for chain in _OWN_CHAINS)
              or any(host.own_rules.values()) or any(host.own_routes.values()))
    items = _mangle_items(4, plan, host.mangle[4], traces) + _mangle_items(6, plan, host.mangle[6], traces)
    for rule in plan.rules:
        count = host.own_rules[rule.family].count(rule)
        note = f" ({count} copies)" if count > 1 else ""
        items.append(Item(_count_status(count), f"ip -{rule.family} rule {' '.join(rule.args())}{note}"))
    for version in (4, 6):
        items += [Item("extra", f"ip -{version} rule {' '.join(rule.args())} (keepsrc's; not in the plan)")
                  for rule in dict.fromkeys(host.own_rules[version]) if rule not in plan.rules]
    for route in plan.routes:
        status: Status = "ok" if route.table in host.local_tables[route.family] else "missing"
        items.append(Item(status, f"ip -{route.family} route {' '.join(route.args())}"))
    for version in (4, 6):
        items += [Item("extra", f"ip -{version} route {' '.join(route.args())} (keepsrc's; not in the plan)")
                  for route in dict.fromkeys(host.own_routes[version]) if route not in plan.routes]
    planned = {s.key: s.value for s in plan.sysctls}
    for key, value in planned.items():
        current = host.sysctls.get(key)
        items.append(Item("ok", f"sysctl {key}={value}") if current == value
                     else Item("drifted", f"sysctl {key} is {current}; the plan sets {value}"))
    saved = _saved_sysctls(_state(host.mangle[4]))
    items += [Item("drifted", f"sysctl {key} is {host.sysctls.get(key)}: keepsrc set it for an earlier plan;"
                              f" --apply or --remove puts back {value}")
              for key, value in saved.items() if key not in planned and host.sysctls.get(key) != value]
    # The guard matters wherever keepsrc is (or was) the reason route_localnet is on.
    needs_guard = ROUTE_LOCALNET in planned or ROUTE_LOCALNET in saved
    exposed = () if not needs_guard or guard_in_place(host.mangle[4]) else _localnet_on(host.route_localnet)
    return Report(plan.node, tuple(items), exposed)


def _localnet_on(route_localnet: dict[str, str]) -> tuple[str, ...]:
    return tuple(name for name, value in route_localnet.items() if value == "1")


def _exposed_text(exposed: tuple[str, ...]) -> str:
    on = ", ".join("all" if name == "all" else f"interface {name}" for name in exposed)
    return (f"route_localnet=1 ({on}) while keepsrc's 127/8 guard is not in place: anything that can send to"
            f" this host can reach services listening on 127/8 here ({CVE})")


def render_check(report: Report, file: str) -> str:
    """The report as printed by `keepsrc netplan --check`."""
    node = report.node
    apply_cmd = f"`keepsrc netplan {file} --node {node} --apply`"
    remove_cmd = f"`keepsrc netplan {file} --node {node} --remove`"
    out = [f"# keepsrc netplan --check: node '{node}' ({file}) in this network namespace"]
    out += [f"{item.status:<8} {item.what}" for item in report.items]
    if report.exposed:
        out.append(f"DANGER: {_exposed_text(report.exposed)}. Fix: {apply_cmd} puts the guard back, or"
                   f" {remove_cmd} takes keepsrc's rules away and route_localnet back to its value before"
                   f" --apply ({SAFE_SYSCTLS[ROUTE_LOCALNET]}, the kernel default, when keepsrc's record of it"
                   " is gone).")
    bad = [item for item in report.items if item.status != "ok"]
    if report.ok:
        out.append(f"keepsrc netplan: in place ({len(report.items)} items)" if report.items
                   else "keepsrc netplan: no original_src listener and nothing of keepsrc's here; nothing to check")
    elif not report.exposed and all(item.status in ("missing", "drifted") for item in report.items):
        out.append(f"keepsrc netplan: not applied here ({len(bad)} of {len(report.items)} items missing);"
                   f" {apply_cmd} applies it")
    else:
        out.append(f"keepsrc netplan: {len(bad)} of {len(report.items)} items missing, drifted or extra;"
                   f" {apply_cmd} puts the plan back, {remove_cmd} takes it away")
    return "\n".join(out) + "\n"


def check(plan: NetPlan) -> Report:
    """`--check` in the current network namespace (raises ApplyError when a tool fails)."""
    return check_plan(plan, read_host(plan))


# -- for the server --------------------------------------------------------------------------------
def localnet_findings(nodes: list[str], mangle4: list[str] | None, route_localnet: dict[str, str]) -> list[str]:
    """Warnings (pure): for each of `nodes` (proxies whose plan sets route_localnet), keepsrc's
    guard is not in place while route_localnet is 1 on this host."""
    if guard_in_place(mangle4):
        return []
    exposed = _localnet_on(route_localnet)
    if not exposed:
        return []
    return [f"proxy '{node}' has an original_src listener with placement local and an upstream on 127/8, so its"
            f" netplan sets route_localnet; on this host {_exposed_text(exposed)}. If '{node}' runs here, run"
            f" `keepsrc netplan <topology> --node {node} --apply` again to put the guard back, or `--remove` to"
            " turn route_localnet off; `--check` lists what else is missing"
            for node in nodes]


def host_findings(topology: Topology) -> list[str]:
    """For the server: a warning per proxy whose original_src placement is local and whose plan
    needs route_localnet, when keepsrc's 127/8 guard is missing from this host's (this network
    namespace's) IPv4 mangle table while route_localnet is 1 on `all` or an interface.

    Reads (never changes) `iptables-save` and /proc/sys; returns [] when no proxy needs the guard,
    when not root, or when iptables is unavailable or fails. It blocks on a subprocess for as long
    as iptables-save takes (bounded by apply.TIMEOUT): call it off the event loop."""
    nodes = [node for node in topology.proxies if needs_route_localnet(topology, node)]
    if not nodes or os.geteuid() != 0 or shutil.which(FAMILIES[0].save) is None:
        return []
    try:
        mangle4 = _mangle_lines(FAMILIES[0])
    except (ApplyError, OSError, subprocess.SubprocessError):
        return []
    return localnet_findings(nodes, mangle4, read_route_localnet())
