"""Apply or remove a NetPlan in the current network namespace; subprocesses live only here.

Idempotent: apply converges the namespace to the plan (chains are re-declared, which flushes
and refills them; jumps, ip rules and routes are added only when missing; keepsrc's leftovers
that the plan no longer has are deleted), so applying twice leaves one copy of everything.

Exact remove: keepsrc deletes only what is recognisably its own (KEEPSRC-* chains, jumps to
them, ip rules and routes with protocol RT_PROTO) and puts back what it changed. What it changed
is recorded at apply time in the namespace itself, in a chain nothing jumps to (KEEPSRC-STATE,
one comment-only rule per fact): that keepsrc applied here, the previous sysctl values, and
whether keepsrc created the mangle table. The record lives and dies with the rules it describes,
so no state file can go stale or outlive its namespace.

A record can still be lost while keepsrc's other traces stay: `iptables -t mangle -F` empties
every chain (the record's too) and leaves route_localnet on; an `iptables-restore` of an older
ruleset drops the chains and leaves the ip rules and the sysctl. When keepsrc finds its own traces
but no record, it cannot trust the current value of a sysctl it sets as "the value before keepsrc":
apply records, and remove restores, the safe kernel default (SAFE_SYSCTLS), and both say so.
`keepsrc netplan --check` (check.py) reports such drift.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keepsrc.netplan.plan import (
    CHAIN_OUTPUT,
    CHAIN_PREROUTING,
    JUMPS,
    RT_PROTO,
    SAFE_SYSCTLS,
    IpRoute,
    IpRule,
    MangleRules,
    NetPlan,
    Sysctl,
    jump_spec,
    restore_text,
)

STATE_CHAIN = "KEEPSRC-STATE"
OWN_CHAINS = (CHAIN_PREROUTING, CHAIN_OUTPUT, STATE_CHAIN)
_STATE_RE = re.compile(r'--comment "?keepsrc-state:([^"\s]+)')
_COUNTERS_RE = re.compile(r"\[\d+:\d+\]$")
_CREATED_TABLE = "created-mangle-table"
_APPLIED = "applied"  # in every record keepsrc writes: an empty chain is a lost record, not a plan without facts
_BUILTINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
TIMEOUT = 30.0


class ApplyError(Exception):
    """A host command failed; the message names the command and what it printed."""


@dataclass(frozen=True)
class _Family:
    version: int
    save: str
    restore: str


FAMILIES = (_Family(4, "iptables-save", "iptables-restore"), _Family(6, "ip6tables-save", "ip6tables-restore"))


def _run(argv: list[str], input: str | None = None) -> str:
    try:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError:
        raise ApplyError(f"'{argv[0]}' is not installed (scripts/install-system-packages installs it)") from None
    except subprocess.TimeoutExpired:
        raise ApplyError(f"`{' '.join(argv)}` did not finish within {TIMEOUT:g}s") from None
    if result.returncode != 0:
        raise ApplyError(f"`{' '.join(argv)}` exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


# -- mangle table ------------------------------------------------------------------------------
def _mangle_lines(family: _Family) -> list[str] | None:
    """The mangle section of `*-save`, or None when the table does not exist. A bare `save` never
    creates a table, while `save -t mangle` would create it with iptables-nft: so dump all."""
    lines: list[str] | None = None
    for line in _run([family.save]).splitlines():
        if line == "*mangle":
            lines = []
        elif lines is not None:
            if line == "COMMIT":
                return lines
            # Chain counters move with traffic; they are not part of what keepsrc compares.
            lines.append(_COUNTERS_RE.sub("[0:0]", line))
    return lines


def _state(lines: list[str] | None) -> list[str]:
    return [m.group(1) for line in lines or () if line.startswith(f"-A {STATE_CHAIN} ")
            for m in [_STATE_RE.search(line)] if m]


def record_intact(state: list[str]) -> bool:
    """The record keepsrc wrote is there (records from before the `applied` fact have sysctl facts)."""
    return _APPLIED in state or any(fact.startswith("sysctl:") for fact in state)


def _own_declared(lines: list[str] | None) -> list[str]:
    declared = [line.split()[0][1:] for line in lines or () if line.startswith(":")]
    return [chain for chain in OWN_CHAINS if chain in declared]


def _without_own(lines: list[str]) -> list[str]:
    """The table as it would be without keepsrc: its chains, their rules and the jumps into them gone."""
    foreign = set(_foreign_refs(lines))
    return [line for line in lines
            if line not in foreign
            and not (line.startswith(":") and line.split()[0][1:] in OWN_CHAINS)
            and not (line.startswith("-A ") and line.split()[1] in OWN_CHAINS)]


def _is_default_empty(lines: list[str]) -> bool:
    """Only the built-in chains, policy ACCEPT, no rules: the table as iptables-nft first creates it."""
    return all(line.startswith(":") and line.split()[0][1:] in _BUILTINS and line.split()[1] == "ACCEPT"
               for line in lines)


def _foreign_refs(lines: list[str]) -> list[str]:
    """Rules outside keepsrc's chains that jump into them: the jumps keepsrc inserted (and copies)."""
    out = []
    for line in lines:
        parts = line.split()
        if (len(parts) > 2 and parts[0] == "-A" and parts[1] not in OWN_CHAINS
                and parts[-2] == "-j" and parts[-1] in OWN_CHAINS):
            out.append(line)
    return out


def _apply_mangle(family: _Family, mangle: MangleRules, state: list[str]) -> bool:
    """Declare (so flush and refill) keepsrc's chains and add missing jumps; True if anything changed."""
    lines = _mangle_lines(family)
    present = set(_foreign_refs(lines or []))
    missing = tuple((chain, target) for chain, target in JUMPS if f"-A {jump_spec(chain, target)}" not in present)
    previous = _state(lines)
    # A lost record (keepsrc's chains are here, its record is not) no longer says who created the
    # table: take it as keepsrc's when nothing but keepsrc's is in it, so --remove deletes it again.
    lost = lines is not None and not record_intact(previous) and bool(_own_declared(lines))
    if (lines is None or _CREATED_TABLE in previous
            or (lost and _is_default_empty(_without_own(lines)))):
        state = [_CREATED_TABLE, *state]
    state = [_APPLIED, *state]
    record = ((STATE_CHAIN, tuple(f'-m comment --comment "keepsrc-state:{fact}"' for fact in state)),)
    _run([family.restore, "--noflush"], input=restore_text(mangle, missing, record))
    return _mangle_lines(family) != lines


def _remove_mangle(family: _Family) -> bool:
    """Delete the jumps into keepsrc's chains, then the chains; True if there was anything."""
    lines = _mangle_lines(family) or []
    own = _own_declared(lines)
    if not own:
        return False
    facts = _state(lines)
    text = ["*mangle"]
    text += ["-D" + line[2:] for line in _foreign_refs(lines)]
    text += [f"-F {chain}" for chain in own] + [f"-X {chain}" for chain in own]
    _run([family.restore, "--noflush"], input="\n".join([*text, "COMMIT"]) + "\n")
    after = _mangle_lines(family)
    # Without a record, whether keepsrc created the table is unknown; a table with nothing in it
    # but empty built-in chains filters nothing, so deleting it then changes no packet's fate.
    created = _CREATED_TABLE in facts or not record_intact(facts)
    if created and after is not None and _is_default_empty(after):
        # Restoring an empty table without --noflush deletes it (iptables-nft), which is how
        # it was before keepsrc's first apply created it.
        _run([family.restore], input="*mangle\nCOMMIT\n")
    return True


# -- sysctls -----------------------------------------------------------------------------------
def _read_sysctl(key: str) -> str:
    return Path(Sysctl(key, "").proc_path).read_text().strip()


def _write_sysctl(key: str, value: str) -> None:
    try:
        Path(Sysctl(key, "").proc_path).write_text(value + "\n")
    except OSError as exc:
        raise ApplyError(f"cannot set {key}={value}: {exc}") from None


def _saved_sysctls(state: list[str]) -> dict[str, str]:
    return dict(fact[len("sysctl:"):].split("=", 1) for fact in state if fact.startswith("sysctl:"))


def _lost_record_value(key: str, current: str, planned: str) -> str | None:
    """The value to take as `key`'s value before keepsrc when keepsrc's record of it is lost and
    `key` reads what keepsrc sets (`planned`): the safe default, or None when none is known."""
    if current != planned:
        return None  # not what keepsrc sets: whatever it is, keepsrc did not set it
    return SAFE_SYSCTLS.get(key)


# -- ip rules and routes -----------------------------------------------------------------------
def _ip_json(*args: str) -> list[dict[str, Any]]:
    # -N: numeric tables and protocols, whatever names /etc/iproute2 defines on this host.
    return list(json.loads(_run(["ip", "-N", "-j", *args]) or "[]"))


def _own_rules(version: int) -> list[IpRule]:
    return [
        IpRule(version, int(entry["fwmark"].split("/")[0], 16), int(entry["table"]), entry.get("iif"))
        for entry in _ip_json(f"-{version}", "rule", "show")
        if entry.get("protocol") == str(RT_PROTO) and "fwmark" in entry
    ]


def _own_routes(version: int) -> list[IpRoute]:
    return [IpRoute(version, int(entry["table"]))
            for entry in _ip_json(f"-{version}", "route", "show", "table", "all", "proto", str(RT_PROTO))
            if entry.get("dst") == "default" and entry.get("dev") == "lo"]


def _route_exists(route: IpRoute) -> bool:
    """Any `local default dev lo` in the table, keepsrc's or another tool's (same key: adding fails)."""
    # `table all` and a filter: showing a table that does not exist yet is an error.
    entries = _ip_json(f"-{route.family}", "route", "show", "table", "all", "type", "local")
    return any(e.get("table") == str(route.table) and e.get("dst") == "default" and e.get("dev") == "lo"
               for e in entries)


def _converge_rules(wanted: tuple[IpRule, ...], changes: list[str]) -> None:
    for version in (4, 6):
        own = _own_rules(version)
        for rule in list(own):
            # Delete keepsrc rules the plan no longer has, and duplicates beyond the first.
            if rule not in wanted or own.count(rule) > 1:
                own.remove(rule)
                _run(["ip", f"-{version}", "rule", "del", *rule.args()])
                changes.append(f"ip -{version} rule del {' '.join(rule.args())}")
        for rule in wanted:
            if rule.family == version and rule not in own:
                _run(["ip", f"-{version}", "rule", "add", *rule.args()])
                changes.append(f"ip -{version} rule add {' '.join(rule.args())}")


def _converge_routes(wanted: tuple[IpRoute, ...], changes: list[str]) -> None:
    for version in (4, 6):
        for route in _own_routes(version):
            if route not in wanted:
                _run(["ip", f"-{version}", "route", "del", *route.args()])
                changes.append(f"ip -{version} route del {' '.join(route.args())}")
        for route in wanted:
            if route.family == version and not _route_exists(route):
                _run(["ip", f"-{version}", "route", "add", *route.args()])
                changes.append(f"ip -{version} route add {' '.join(route.args())}")


# -- entry points ------------------------------------------------------------------------------
def _has_traces() -> bool:
    """Anything of keepsrc's here: its chains (either family), or its ip rules or routes."""
    return (any(_own_declared(_mangle_lines(family)) for family in FAMILIES)
            or any(_own_rules(version) or _own_routes(version) for version in (4, 6)))


def apply(plan: NetPlan) -> list[str]:
    """Make the current network namespace match `plan`; returns what changed, for the user."""
    if plan.empty:
        return remove(plan)
    changes: list[str] = []
    v4_state = _state(_mangle_lines(FAMILIES[0]))
    saved = _saved_sysctls(v4_state)
    wanted = {s.key: s.value for s in plan.sysctls}
    lost = not record_intact(v4_state) and bool(wanted) and _has_traces()
    # Record each sysctl's value from before keepsrc's *first* apply; a re-apply keeps that record.
    record: dict[str, str] = {}
    for key, value in wanted.items():
        current = _read_sysctl(key)
        safe = _lost_record_value(key, current, value) if lost and key not in saved else None
        record[key] = saved.get(key) or safe or current
        if safe is not None:
            changes.append(f"sysctl {key}: keepsrc's record of its value before --apply is gone (mangle flushed or"
                           f" an older ruleset restored?) and it reads {current}, as keepsrc sets it; recorded"
                           f" {safe}, the kernel default and the safe value, as what --remove restores")
    for family, mangle in zip(FAMILIES, (plan.mangle4, plan.mangle6), strict=True):
        facts = [f"sysctl:{key}={value}" for key, value in record.items()] if family.version == 4 else []
        if _apply_mangle(family, mangle, facts):
            changes.append(f"mangle (IPv{family.version}): {CHAIN_PREROUTING}, {CHAIN_OUTPUT} and jumps to them")
    for key, value in saved.items():
        if key not in wanted and _read_sysctl(key) != value:
            _write_sysctl(key, value)
            changes.append(f"sysctl {key}={value} (restored)")
    for key, value in wanted.items():
        if _read_sysctl(key) != value:
            _write_sysctl(key, value)
            changes.append(f"sysctl {key}={value}")
    _converge_rules(plan.rules, changes)
    _converge_routes(plan.routes, changes)
    return changes


def remove(plan: NetPlan | None = None, notes: list[str] | None = None) -> list[str]:
    """Delete everything keepsrc's netplan put in this namespace and restore what it changed.

    With `plan`, a sysctl the plan sets whose prior value keepsrc's record no longer holds (the
    record was lost, see the module doc) goes back to its safe default while keepsrc's traces show
    it was applied here; without traces it is left alone and `notes` (if given) say why."""
    changes: list[str] = []
    state = _state(_mangle_lines(FAMILIES[0]))
    saved = _saved_sysctls(state)
    for key, value in saved.items():
        if _read_sysctl(key) != value:
            _write_sysctl(key, value)
            changes.append(f"sysctl {key}={value} (restored)")
    if plan is not None and plan.sysctls and not record_intact(state):
        traces = _has_traces()
        for sysctl in plan.sysctls:
            current = _read_sysctl(sysctl.key)
            safe = _lost_record_value(sysctl.key, current, sysctl.value)
            if sysctl.key in saved or safe is None or safe == current:
                continue
            if traces:
                _write_sysctl(sysctl.key, safe)
                changes.append(f"sysctl {sysctl.key}={safe} (restored to the kernel default, the safe value:"
                               " keepsrc's record of the value before --apply is gone; set it again if another"
                               " tool here needs it)")
            elif notes is not None:
                notes.append(f"{sysctl.key} is {current}, as keepsrc sets it, but nothing else of keepsrc's is"
                             " here, so it is not keepsrc's to undo; if keepsrc set it (its record lost), run"
                             f" `sysctl -w {sysctl.key}={safe}`")
    for family in FAMILIES:
        if _remove_mangle(family):
            changes.append(f"mangle (IPv{family.version}): keepsrc's chains and the jumps to them removed")
    _converge_rules((), changes)
    _converge_routes((), changes)
    return changes
