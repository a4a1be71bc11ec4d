"""keepsrc netplan --check, the 127/8 guard and a lost state record (issue 15).

route_localnet=1 is only safe while the plan's 127/8 guard is in the mangle table; a mangle flush
or an older ruleset restored takes the guard (and keepsrc's state record) away and leaves the
sysctl on. The namespace tests run the real command in a fresh network namespace and end with
the namespace as it began (`iptables-save` and the rest of `_state` before == after).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import keepsrc.netplan.check as check_module
from keepsrc.netplan import plan_for
from keepsrc.netplan.check import (
    CVE,
    HostState,
    canonical,
    check_plan,
    guard_in_place,
    host_findings,
    localnet_findings,
    render_check,
)
from keepsrc.netplan.plan import LOCALNET_GUARD
from keepsrc.topology import load_topology
from tests.support.netns import NetNs
from tests.test_netplan import EXAMPLES, GATEWAY_YAML, UDP_GATEWAY_YAML, _netplan, _write
from tests.test_netplan import _state as namespace_state
from tests.test_netplan import host as host  # the `host` fixture: a fresh namespace with iptables
from tests.test_netplan import netlab_fixture as netlab_fixture  # the `netlab` fixture behind it

INNER_TCP = EXAMPLES / "inner-tcp.yaml"
GUARD_MISSING = "missing  IPv4 mangle KEEPSRC-PREROUTING: the 127/8 guard, ! -i lo -d 127.0.0.0/8"
DANGER = "DANGER: route_localnet=1 (all) while keepsrc's 127/8 guard is not in place"
RECORD_LOST = ("sysctl net.ipv4.conf.all.route_localnet=0 (restored to the kernel default, the safe value:"
               " keepsrc's record of the value before --apply is gone")

# The IPv4 mangle table as iptables-save (nf_tables) prints inner-tcp's plan: generic matches
# reordered, `'` in a comment escaped.
SAVED_GUARD = ('-A KEEPSRC-PREROUTING -d 127.0.0.0/8 ! -i lo -m comment --comment "keepsrc: route_localnet is on;'
               ' keep 127/8 unreachable from the network" -j DROP')
SAVED_JUMP = "-A PREROUTING -m comment --comment keepsrc -j KEEPSRC-PREROUTING"
DECLARED = [":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":KEEPSRC-OUTPUT - [0:0]",
            ":KEEPSRC-PREROUTING - [0:0]", ":KEEPSRC-STATE - [0:0]"]


def _check(ns: NetNs, path: Path, node: str) -> tuple[int, str]:
    result = ns.run(sys.executable, "-m", "keepsrc.netplan", str(path), "--node", node, "--check", check=False)
    assert not result.stderr, result.stderr
    return result.returncode, result.stdout


def _host_findings(ns: NetNs, path: Path) -> list[str]:
    """host_findings() as the server would call it, run inside the namespace."""
    code = ("import json, sys; from keepsrc.netplan.check import host_findings;"
            " from keepsrc.topology import load_topology;"
            " print(json.dumps(host_findings(load_topology(sys.argv[1]))))")
    return list(json.loads(ns.run(sys.executable, "-c", code, str(path)).stdout))


def _remove_netplan(ns: NetNs, path: Path, node: str) -> str:
    return ns.run(sys.executable, "-m", "keepsrc.netplan", str(path), "--node", node, "--remove").stdout


# -- pure ----------------------------------------------------------------------------------------
def test_canonical_reads_a_rule_as_iptables_save_prints_it() -> None:
    assert canonical(LOCALNET_GUARD) == canonical(SAVED_GUARD.split(" ", 2)[2])
    saved_reply = ('-p tcp -m connmark --mark 0x539 -m comment --comment "keepsrc: local upstream\\\'s reply;'
                   ' table 133 returns it to Envoy" -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff')
    [planned_reply] = dict(plan_for(load_topology(INNER_TCP), "svc-b").mangle4.chains)["KEEPSRC-OUTPUT"]
    assert planned_reply != saved_reply and canonical(planned_reply) == canonical(saved_reply)
    # A negation belongs to its match: `! -i lo` is not `-i lo`.
    assert canonical("! -i lo -d 127.0.0.0/8 -j DROP") != canonical("-i lo -d 127.0.0.0/8 -j DROP")


def test_guard_in_place_needs_the_rule_and_the_jump() -> None:
    assert guard_in_place([*DECLARED, SAVED_JUMP, SAVED_GUARD])
    assert not guard_in_place([*DECLARED, SAVED_GUARD])  # nothing jumps to it: the flush-then-partial case
    assert not guard_in_place([*DECLARED, SAVED_JUMP])
    assert not guard_in_place(None)


def test_localnet_findings_name_the_proxy_the_cve_and_the_fix() -> None:
    [finding] = localnet_findings(["svc-b"], DECLARED, {"all": "1", "lo": "0", "eth0": "0"})
    assert "proxy 'svc-b'" in finding and CVE in finding
    assert "route_localnet=1 (all)" in finding and "127/8 guard is not in place" in finding
    assert "`keepsrc netplan <topology> --node svc-b --apply`" in finding and "`--remove`" in finding
    # The kernel ORs `all` with each interface's own value: an interface alone is enough.
    [finding] = localnet_findings(["svc-b"], None, {"all": "0", "eth0": "1"})
    assert "route_localnet=1 (interface eth0)" in finding
    assert localnet_findings(["svc-b"], [*DECLARED, SAVED_JUMP, SAVED_GUARD], {"all": "1"}) == []
    assert localnet_findings(["svc-b"], DECLARED, {"all": "0", "eth0": "0"}) == []


def test_host_findings_reads_nothing_unless_a_proxy_needs_the_guard(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_io(*_: object) -> None:
        raise AssertionError("host_findings ran iptables-save")

    monkeypatch.setattr(check_module, "_mangle_lines", no_io)
    # gateway placement and an upstream off 127/8: no route_localnet, so nothing to read.
    assert host_findings(load_topology(_write(tmp_path, GATEWAY_YAML))) == []
    assert host_findings(load_topology(EXAMPLES / "client-ip-policies.yaml")) == []
    monkeypatch.setattr(check_module.os, "geteuid", lambda: 1000)
    assert host_findings(load_topology(INNER_TCP)) == []  # not root: iptables-save cannot read


def test_host_findings_is_empty_without_iptables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check_module.os, "geteuid", lambda: 0)
    monkeypatch.setattr(check_module.shutil, "which", lambda _: None)
    assert host_findings(load_topology(INNER_TCP)) == []


def test_check_plan_after_a_flush_reports_the_guard_as_the_dangerous_case() -> None:
    plan = plan_for(load_topology(INNER_TCP), "svc-b")
    flushed = HostState(
        mangle={4: DECLARED, 6: DECLARED}, own_rules={4: list(plan.rules[:1]), 6: list(plan.rules[1:])},
        own_routes={4: [plan.routes[0]], 6: [plan.routes[1]]}, local_tables={4: {133}, 6: {133}},
        sysctls={"net.ipv4.conf.all.route_localnet": "1"}, route_localnet={"all": "1", "lo": "0"})
    report = check_plan(plan, flushed)
    assert not report.ok and report.exposed == ("all",)
    text = render_check(report, "inner-tcp.yaml")
    assert GUARD_MISSING in text and DANGER in text and CVE in text
    assert "`keepsrc netplan inner-tcp.yaml --node svc-b --apply` puts the guard back" in text
    assert "`keepsrc netplan inner-tcp.yaml --node svc-b --remove`" in text
    assert "ok       ip -4 rule fwmark 0x539 lookup 133 protocol 107" in text
    assert ("missing  IPv4 mangle KEEPSRC-STATE: keepsrc's record of what --apply changed; --remove would restore"
            " the kernel default net.ipv4.conf.all.route_localnet=0") in text


# -- in a fresh namespace -------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["local-tcp", "local-udp", "gateway-tcp", "gateway-udp"])
def test_check_passes_after_apply(host: NetNs, tmp_path: Path, case: str) -> None:
    path, node = {
        "local-tcp": (INNER_TCP, "svc-b"),
        "local-udp": (EXAMPLES / "sip-udp.yaml", "svc-b"),
        "gateway-tcp": (_write(tmp_path, GATEWAY_YAML), "gateway"),
        "gateway-udp": (_write(tmp_path, UDP_GATEWAY_YAML), "gateway"),  # IPv6 udp rules too
    }[case]
    before = namespace_state(host)
    code, text = _check(host, path, node)
    assert code == 1 and "keepsrc netplan: not applied here" in text and "DANGER" not in text
    _netplan(host, path, node, "--apply")
    code, text = _check(host, path, node)
    assert code == 0, text
    assert all(line.startswith(("#", "ok ")) for line in text.splitlines()[:-1]), text
    assert text.splitlines()[-1].startswith("keepsrc netplan: in place (")
    _netplan(host, path, node, "--remove")
    assert namespace_state(host) == before


def test_a_mangle_flush_is_named_and_reapply_fixes_it(host: NetNs) -> None:
    before = namespace_state(host)
    _netplan(host, INNER_TCP, "svc-b", "--apply")
    assert _check(host, INNER_TCP, "svc-b")[0] == 0
    assert _host_findings(host, INNER_TCP) == []

    host.run("iptables", "-t", "mangle", "-F")  # takes the guard and the state record; leaves the sysctl
    code, text = _check(host, INNER_TCP, "svc-b")
    assert code == 1
    assert GUARD_MISSING in text and DANGER in text and CVE in text
    assert "--node svc-b --apply` puts the guard back" in text and "--node svc-b --remove` takes" in text
    [finding] = _host_findings(host, INNER_TCP)
    assert "proxy 'svc-b'" in finding and "127/8 guard is not in place" in finding and CVE in finding

    changes = _netplan(host, INNER_TCP, "svc-b", "--apply")
    # The record was flushed while route_localnet read 1 (keepsrc's own value): 0 is recorded instead.
    assert "recorded 0, the kernel default and the safe value, as what --remove restores" in changes
    assert _check(host, INNER_TCP, "svc-b")[0] == 0
    assert _host_findings(host, INNER_TCP) == []
    _netplan(host, INNER_TCP, "svc-b", "--remove")
    assert namespace_state(host) == before


def test_remove_without_the_state_record_restores_route_localnet_to_0(host: NetNs) -> None:
    before = namespace_state(host)
    assert before["route_localnet"] == "0"
    _netplan(host, INNER_TCP, "svc-b", "--apply")
    for tables in ("iptables", "ip6tables"):  # the record gone, the rules and the sysctl still there
        host.run(tables, "-t", "mangle", "-F", "KEEPSRC-STATE")
        host.run(tables, "-t", "mangle", "-X", "KEEPSRC-STATE")
    code, text = _check(host, INNER_TCP, "svc-b")
    assert code == 1 and "DANGER" not in text  # the guard is still there
    assert ("missing  IPv4 mangle KEEPSRC-STATE: keepsrc's record of what --apply changed; --remove would"
            " restore the kernel default net.ipv4.conf.all.route_localnet=0") in text
    assert RECORD_LOST in _remove_netplan(host, INNER_TCP, "svc-b")
    after = namespace_state(host)
    assert after["route_localnet"] == "0"
    assert "keepsrc" not in after["iptables-save"] + after["ip6tables-save"]
    assert after == before


def test_an_older_ruleset_restored_is_named_and_remove_cleans_up(host: NetNs, tmp_path: Path) -> None:
    """`iptables-restore` of a file saved before --apply: keepsrc's chains go, the ip rules and
    route_localnet stay."""
    host.run("iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "-j", "MARK", "--set-mark", "7")
    older = host.run("iptables-save").stdout
    before = namespace_state(host)
    _netplan(host, INNER_TCP, "svc-b", "--apply")
    host.run("iptables-restore", input=older)
    code, text = _check(host, INNER_TCP, "svc-b")
    assert code == 1 and GUARD_MISSING in text and DANGER in text
    assert "ok       ip -4 rule fwmark 0x539 lookup 133 protocol 107" in text
    assert len(_host_findings(host, INNER_TCP)) == 1
    assert RECORD_LOST in _remove_netplan(host, INNER_TCP, "svc-b")
    assert namespace_state(host) == before  # the other tool's MARK rule kept


def test_remove_leaves_route_localnet_alone_when_nothing_of_keepsrc_is_here(host: NetNs) -> None:
    """Another tool's route_localnet=1 and no keepsrc trace (e.g. a second --remove after the
    first restored it): not keepsrc's to undo; a note says how, and nothing changes."""
    host.run("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
    before = namespace_state(host)
    result = host.run(sys.executable, "-m", "keepsrc.netplan", str(INNER_TCP), "--node", "svc-b", "--remove")
    assert result.stdout.strip() == "keepsrc netplan: already removed; nothing changed"
    assert "not keepsrc's to undo" in result.stderr and "sysctl -w net.ipv4.conf.all.route_localnet=0" in result.stderr
    assert namespace_state(host) == before


def test_check_of_a_node_without_original_src(host: NetNs) -> None:
    before = namespace_state(host)
    code, text = _check(host, EXAMPLES / "external-tcp.yaml", "ingress")
    assert code == 0 and "nothing to check" in text
    # keepsrc's rules from another plan are extra here.
    _netplan(host, INNER_TCP, "svc-b", "--apply")
    code, text = _check(host, EXAMPLES / "external-tcp.yaml", "ingress")
    assert code == 1 and "extra    ip -4 rule fwmark 0x539 lookup 133 protocol 107 (keepsrc's; not in the plan)" in text
    _netplan(host, INNER_TCP, "svc-b", "--remove")
    assert namespace_state(host) == before
