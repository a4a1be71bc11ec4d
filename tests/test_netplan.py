"""keepsrc netplan: the exact plan text, its refusals, and apply/apply/remove in a fresh namespace.

The apply tests run the real command (`python -m keepsrc.netplan`) inside a network namespace
the test creates, so the host's own iptables and rules are never touched.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

from keepsrc.netplan import PlanError, plan_for, render
from keepsrc.netplan.cli import add_netplan_arguments, run_netplan
from keepsrc.topology import load_topology
from tests.support.netns import Lab, NetNs
from tests.support.netns import netlab_fixture as netlab_fixture  # the `netlab` fixture
from tests.support.strict import require_binary

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

GATEWAY_YAML = """\
apiVersion: keepsrc/v1
services:
  app: {endpoints: ["198.18.2.2:9000"]}
proxies:
  gateway:
    listeners:
      - name: in
        address: 198.18.1.2:15006
        protocol: tcp
        service: app
        original_src: {placement: gateway, upstream_interface: eth1}
"""

INNER_TCP_PLAN = """\
# keepsrc netplan for node 'svc-b' (inner-tcp.yaml)
# mark 1337 (0x539), table 133, placement local: the upstream app runs in this network namespace (listeners: inbound-tcp)
# `keepsrc netplan --apply` applies this idempotently; `--remove` undoes it exactly.

# IPv4 mangle table: iptables-restore --noflush
*mangle
:KEEPSRC-PREROUTING - [0:0]
:KEEPSRC-OUTPUT - [0:0]
-A KEEPSRC-PREROUTING ! -i lo -d 127.0.0.0/8 -m comment --comment "keepsrc: route_localnet is on; keep 127/8 unreachable from the network" -j DROP
-A KEEPSRC-PREROUTING -p tcp -m mark --mark 0x539 -m comment --comment "keepsrc: Envoy's upstream SYN came back through lo; mark 1337 the connection" -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A KEEPSRC-OUTPUT -p tcp -m connmark --mark 0x539 -m comment --comment "keepsrc: local upstream's reply; table 133 returns it to Envoy" -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-I PREROUTING 1 -m comment --comment keepsrc -j KEEPSRC-PREROUTING
-I OUTPUT 1 -m comment --comment keepsrc -j KEEPSRC-OUTPUT
COMMIT

# IPv6 mangle table: ip6tables-restore --noflush
*mangle
:KEEPSRC-PREROUTING - [0:0]
:KEEPSRC-OUTPUT - [0:0]
-A KEEPSRC-PREROUTING -p tcp -m mark --mark 0x539 -m comment --comment "keepsrc: Envoy's upstream SYN came back through lo; mark 1337 the connection" -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A KEEPSRC-OUTPUT -p tcp -m connmark --mark 0x539 -m comment --comment "keepsrc: local upstream's reply; table 133 returns it to Envoy" -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-I PREROUTING 1 -m comment --comment keepsrc -j KEEPSRC-PREROUTING
-I OUTPUT 1 -m comment --comment keepsrc -j KEEPSRC-OUTPUT
COMMIT

# policy routing: marked replies -> table -> lo (protocol 107 tags keepsrc's own)
ip -4 rule add fwmark 0x539 lookup 133 protocol 107
ip -6 rule add fwmark 0x539 lookup 133 protocol 107
ip -4 route add local default dev lo table 133 protocol 107
ip -6 route add local default dev lo table 133 protocol 107

# an upstream on 127/8 replies from a loopback source to a remote address; allow that routing
sysctl -w net.ipv4.conf.all.route_localnet=1
"""  # noqa: E501

GATEWAY_PLAN = """\
# keepsrc netplan for node 'gateway' (gateway.yaml)
# mark 1337 (0x539), table 133, placement gateway: the upstream is another host; its replies arrive on eth1 (listeners: in)
# `keepsrc netplan --apply` applies this idempotently; `--remove` undoes it exactly.

# IPv4 mangle table: iptables-restore --noflush
*mangle
:KEEPSRC-PREROUTING - [0:0]
:KEEPSRC-OUTPUT - [0:0]
-A KEEPSRC-PREROUTING -i eth1 -p tcp -m connmark --mark 0x539 -m comment --comment "keepsrc: upstream's reply on eth1; table 133 returns it to Envoy" -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A KEEPSRC-OUTPUT -p tcp -m mark --mark 0x539 -m comment --comment "keepsrc: Envoy's upstream SYN; mark 1337 the connection" -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-I PREROUTING 1 -m comment --comment keepsrc -j KEEPSRC-PREROUTING
-I OUTPUT 1 -m comment --comment keepsrc -j KEEPSRC-OUTPUT
COMMIT

# IPv6 mangle table: ip6tables-restore --noflush
*mangle
:KEEPSRC-PREROUTING - [0:0]
:KEEPSRC-OUTPUT - [0:0]
-A KEEPSRC-PREROUTING -i eth1 -p tcp -m connmark --mark 0x539 -m comment --comment "keepsrc: upstream's reply on eth1; table 133 returns it to Envoy" -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A KEEPSRC-OUTPUT -p tcp -m mark --mark 0x539 -m comment --comment "keepsrc: Envoy's upstream SYN; mark 1337 the connection" -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-I PREROUTING 1 -m comment --comment keepsrc -j KEEPSRC-PREROUTING
-I OUTPUT 1 -m comment --comment keepsrc -j KEEPSRC-OUTPUT
COMMIT

# policy routing: marked replies -> table -> lo (protocol 107 tags keepsrc's own)
ip -4 rule add fwmark 0x539 iif eth1 lookup 133 protocol 107
ip -6 rule add fwmark 0x539 iif eth1 lookup 133 protocol 107
ip -4 route add local default dev lo table 133 protocol 107
ip -6 route add local default dev lo table 133 protocol 107
"""  # noqa: E501


SIP_UDP_PLAN = """\
# keepsrc netplan for node 'svc-b' (sip-udp.yaml)
# mark 1337 (0x539), table 133, placement local: the upstream app runs in this network namespace (listeners: sip-trunk)
#   udp: Envoy's udp_proxy sets no mark; its datagrams are recognised by their client source and the upstream (127.0.0.1:5070): re-apply when those change
#   udp: the upstream can send first (e.g. a SIP BYE) only while conntrack keeps the session: raise net.netfilter.nf_conntrack_udp_timeout{,_stream} (30s/120s) above the longest silence
# `keepsrc netplan --apply` applies this idempotently; `--remove` undoes it exactly.

# IPv4 mangle table: iptables-restore --noflush
*mangle
:KEEPSRC-PREROUTING - [0:0]
:KEEPSRC-OUTPUT - [0:0]
-A KEEPSRC-PREROUTING ! -i lo -d 127.0.0.0/8 -m comment --comment "keepsrc: route_localnet is on; keep 127/8 unreachable from the network" -j DROP
-A KEEPSRC-OUTPUT -d 127.0.0.1/32 -p udp -m udp --dport 5070 -m addrtype ! --src-type LOCAL -m comment --comment "keepsrc: Envoy's udp datagram from a client's address (udp_proxy sets no mark); mark 1337 the session" -j CONNMARK --set-xmark 0x539/0xffffffff
-A KEEPSRC-OUTPUT -p udp -m connmark --mark 0x539 -m comment --comment "keepsrc: local upstream's reply datagram; table 133 returns it to Envoy" -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-I PREROUTING 1 -m comment --comment keepsrc -j KEEPSRC-PREROUTING
-I OUTPUT 1 -m comment --comment keepsrc -j KEEPSRC-OUTPUT
COMMIT

# IPv6 mangle table: ip6tables-restore --noflush
*mangle
:KEEPSRC-PREROUTING - [0:0]
:KEEPSRC-OUTPUT - [0:0]
-I PREROUTING 1 -m comment --comment keepsrc -j KEEPSRC-PREROUTING
-I OUTPUT 1 -m comment --comment keepsrc -j KEEPSRC-OUTPUT
COMMIT

# policy routing: marked replies -> table -> lo (protocol 107 tags keepsrc's own)
ip -4 rule add fwmark 0x539 lookup 133 protocol 107
ip -6 rule add fwmark 0x539 lookup 133 protocol 107
ip -4 route add local default dev lo table 133 protocol 107
ip -6 route add local default dev lo table 133 protocol 107

# an upstream on 127/8 replies from a loopback source to a remote address; allow that routing
sysctl -w net.ipv4.conf.all.route_localnet=1
"""  # noqa: E501

UDP_GATEWAY_YAML = """\
apiVersion: keepsrc/v1
services:
  sip: {endpoints: ["198.18.2.2:5060", "[2001:db8:2::2]:5060"]}
  app: {endpoints: ["198.18.2.2:9000"]}
proxies:
  gateway:
    listeners:
      - {name: sip, address: 198.18.1.2:5060, protocol: udp, service: sip,
         original_src: {placement: gateway, upstream_interface: eth1}}
      - {name: in, address: 198.18.1.2:15006, protocol: tcp, service: app,
         original_src: {placement: gateway, upstream_interface: eth1}}
"""


def _write(tmp_path: Path, text: str, name: str = "topology.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _cli(path: Path, node: str, *flags: str) -> int:
    parser = argparse.ArgumentParser()
    add_netplan_arguments(parser)
    return run_netplan(parser.parse_args([str(path), "--node", node, *flags]))


# -- the plan as text ------------------------------------------------------------------------------
def test_inner_tcp_plan_is_the_talks_rules_with_a_guard_for_route_localnet() -> None:
    plan = plan_for(load_topology(EXAMPLES / "inner-tcp.yaml"), "svc-b")
    assert render(plan, "inner-tcp.yaml") == INNER_TCP_PLAN


def test_external_tcp_backend_envoy_gets_the_same_local_plan() -> None:
    plan = plan_for(load_topology(EXAMPLES / "external-tcp.yaml"), "svc-b")
    assert render(plan, "inner-tcp.yaml") == INNER_TCP_PLAN


def test_gateway_plan_saves_in_output_restores_on_the_upstream_interface(tmp_path: Path) -> None:
    plan = plan_for(load_topology(_write(tmp_path, GATEWAY_YAML)), "gateway")
    assert render(plan, "gateway.yaml") == GATEWAY_PLAN


def test_sip_udp_plan_marks_envoys_datagrams_by_their_upstream() -> None:
    # udp_proxy sets no SO_MARK: the first OUTPUT rule sets the connection's mark itself, from
    # a non-local source towards the SIP server; the second hands it to the server's replies.
    plan = plan_for(load_topology(EXAMPLES / "sip-udp.yaml"), "svc-b")
    assert render(plan, "sip-udp.yaml") == SIP_UDP_PLAN


def test_udp_gateway_plan_restores_on_the_upstream_interface_per_family(tmp_path: Path) -> None:
    plan = plan_for(load_topology(_write(tmp_path, UDP_GATEWAY_YAML)), "gateway")
    [mark_set] = plan.mark_sets  # the tcp and the udp listener share mark, table and interface
    assert mark_set.listeners == ("sip", "in") and mark_set.tcp
    assert [str(u) for u in mark_set.udp_upstreams] == ["198.18.2.2:5060", "[2001:db8:2::2]:5060"]
    for mangle, udp_destination in ((plan.mangle4, "-d 198.18.2.2/32 "), (plan.mangle6, "-d 2001:db8:2::2/128 ")):
        chains = dict(mangle.chains)
        [tcp_save, udp_mark] = chains["KEEPSRC-OUTPUT"]
        assert tcp_save.startswith("-p tcp -m mark --mark 0x539 ") and "--save-mark" in tcp_save
        assert udp_mark.startswith(f"{udp_destination}-p udp -m udp --dport 5060 -m addrtype ! --src-type LOCAL ")
        assert udp_mark.endswith(" -j CONNMARK --set-xmark 0x539/0xffffffff")
        [tcp_restore, udp_restore] = chains["KEEPSRC-PREROUTING"]
        assert tcp_restore.startswith("-i eth1 -p tcp -m connmark --mark 0x539 ")
        assert udp_restore.startswith("-i eth1 -p udp -m connmark --mark 0x539 ") and "--restore-mark" in udp_restore
    assert {r.iif for r in plan.rules} == {"eth1"}
    assert not plan.sysctls


def test_cli_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, GATEWAY_YAML)
    assert _cli(path, "gateway") == 0
    assert capsys.readouterr().out == GATEWAY_PLAN.replace("gateway.yaml", str(path))


def test_a_node_without_original_src_needs_no_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(EXAMPLES / "external-tcp.yaml", "ingress") == 0
    assert "has no original_src listener; nothing to do" in capsys.readouterr().out


def test_each_distinct_mark_and_table_gets_its_own_rules(tmp_path: Path) -> None:
    path = _write(tmp_path, """\
apiVersion: keepsrc/v1
services:
  local-app: {endpoints: ["198.18.9.1:9000"]}
  remote-app: {endpoints: ["198.18.2.2:9000"]}
proxies:
  edge:
    listeners:
      - {name: a, address: 198.18.1.2:1001, protocol: tcp, service: local-app,
         original_src: {placement: local}}
      - {name: b, address: 198.18.1.2:1002, protocol: tcp, service: local-app,
         original_src: {placement: local}}
      - {name: c, address: 198.18.1.2:1003, protocol: tcp, service: local-app,
         original_src: {placement: local, mark: 1338, table: 134}}
      - {name: d, address: 198.18.1.2:1004, protocol: tcp, service: remote-app,
         original_src: {placement: gateway, upstream_interface: eth1, mark: 1339}}
""")
    plan = plan_for(load_topology(path), "edge")
    assert [(s.mark, s.table, s.listeners) for s in plan.mark_sets] == [
        (1337, 133, ("a", "b")), (1338, 134, ("c",)), (1339, 133, ("d",))]
    text = render(plan, "edge.yaml")
    for family in (4, 6):
        assert f"ip -{family} rule add fwmark 0x539 lookup 133 protocol 107" in text
        assert f"ip -{family} rule add fwmark 0x53a lookup 134 protocol 107" in text
        assert f"ip -{family} rule add fwmark 0x53b iif eth1 lookup 133 protocol 107" in text
        assert f"ip -{family} route add local default dev lo table 133 protocol 107" in text
        assert f"ip -{family} route add local default dev lo table 134 protocol 107" in text
    assert len(plan.rules) == 6 and len(plan.routes) == 4
    # No upstream on 127/8: route_localnet (and its guard) stay off.
    assert not plan.sysctls and "route_localnet" not in text


# -- refusals ----------------------------------------------------------------------------------------
LISTENER = ("      - {{name: inbound, address: 198.18.1.2:15006, protocol: {protocol}, service: app,"
            " original_src: {osrc}}}\n")
HEADER = 'apiVersion: keepsrc/v1\nservices:\n  app: {endpoints: ["127.0.0.1:9000"]}\nproxies:\n  svc:\n    listeners:\n'


def test_refuses_to_guess_the_placement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, HEADER + LISTENER.format(protocol="tcp", osrc="true"))
    assert _cli(path, "svc") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: proxies.svc.listeners[0].original_src.placement: listener 'inbound'")
    assert "`original_src.placement: local`" in err
    assert "`original_src.placement: gateway`" in err
    assert "`original_src.upstream_interface: <interface" in err


def test_refuses_a_mark_shared_by_local_and_gateway_listeners(tmp_path: Path) -> None:
    path = _write(tmp_path, HEADER + LISTENER.format(protocol="tcp", osrc="{placement: local}")
                  + "      - {name: out, address: 198.18.1.2:15007, protocol: tcp, service: app,"
                    " original_src: {placement: gateway, upstream_interface: eth1}}\n")
    with pytest.raises(PlanError) as caught:
        plan_for(load_topology(path), "svc")
    [(key, message)] = caught.value.problems
    assert key == "proxies.svc.listeners[1].original_src.mark"
    assert "'inbound' (local) and 'out' (gateway) share mark 1337" in message


def test_refuses_udp_original_src_to_a_dns_upstream(tmp_path: Path) -> None:
    # The udp rules match Envoy's datagrams by the upstream's address: a name cannot be matched.
    path = _write(tmp_path, HEADER.replace('"127.0.0.1:9000"', '"sip.example.com:5060"')
                  + LISTENER.format(protocol="udp", osrc="{placement: local}"))
    with pytest.raises(PlanError) as caught:
        plan_for(load_topology(path), "svc")
    [(key, message)] = caught.value.problems
    assert key == "services.app.endpoints[0]"
    assert "listener 'inbound' is udp with original_src" in message
    assert "'sip.example.com' is a DNS name" in message


def test_unknown_node_lists_the_proxies(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(EXAMPLES / "inner-tcp.yaml", "svc-c") == 2
    assert "no proxy named 'svc-c'; proxies in this file: svc-b" in capsys.readouterr().err


# -- apply / remove in a fresh namespace ------------------------------------------------------------
@pytest.fixture
def host(netlab: Lab) -> NetNs:
    for tool in ("iptables", "ip6tables", "iptables-save", "ip6tables-save", "iptables-restore"):
        require_binary(tool)
    return netlab.ns("host")


def _netplan(ns: NetNs, path: Path, node: str, *flags: str) -> str:
    return ns.run(sys.executable, "-m", "keepsrc.netplan", str(path), "--node", node, *flags).stdout


def _state(ns: NetNs) -> dict[str, str]:
    """What a person compares: every table and rule list keepsrc may touch, minus timestamps."""
    def run(*cmd: str) -> str:
        return "\n".join(line for line in ns.run(*cmd).stdout.splitlines() if not line.startswith("#"))

    return {
        "iptables-save": run("iptables-save"),
        "ip6tables-save": run("ip6tables-save"),
        "ip rule": run("ip", "-4", "rule"),
        "ip -6 rule": run("ip", "-6", "rule"),
        "ip route": run("ip", "-4", "route", "show", "table", "all"),
        "ip -6 route": run("ip", "-6", "route", "show", "table", "all"),
        "route_localnet": run("sysctl", "-n", "net.ipv4.conf.all.route_localnet"),
    }


def _count(text: str, pattern: str) -> int:
    return len(re.findall(pattern, text, re.MULTILINE))


def _gateway_file(tmp_path: Path) -> Path:
    return _write(tmp_path, GATEWAY_YAML)


@pytest.mark.parametrize("placement", ["local", "gateway"])
def test_apply_twice_leaves_one_copy_and_remove_restores_a_fresh_namespace(
        host: NetNs, tmp_path: Path, placement: str) -> None:
    if placement == "local":  # the talk's sidecar: upstream on 127.0.0.1, so route_localnet too
        path, node, localnet = EXAMPLES / "inner-tcp.yaml", "svc-b", True
    else:
        path, node, localnet = _gateway_file(tmp_path), "gateway", False
    before = _state(host)
    _netplan(host, path, node, "--apply")
    assert _netplan(host, path, node, "--apply").strip() == "keepsrc netplan: already applied; nothing changed"
    applied = _state(host)
    for save in ("iptables-save", "ip6tables-save"):
        assert _count(applied[save], r"^-A PREROUTING -m comment --comment keepsrc -j KEEPSRC-PREROUTING$") == 1
        assert _count(applied[save], r"^-A OUTPUT -m comment --comment keepsrc -j KEEPSRC-OUTPUT$") == 1
        assert _count(applied[save], r"CONNMARK --save-mark") == 1
        assert _count(applied[save], r"CONNMARK --restore-mark") == 1
    for rules in ("ip rule", "ip -6 rule"):
        assert _count(applied[rules], r"fwmark 0x539 .*lookup 133 proto 107$") == 1
    for routes in ("ip route", "ip -6 route"):
        assert _count(applied[routes], r"^local default dev lo table 133 proto 107\b") == 1
    assert applied["route_localnet"] == ("1" if localnet else "0")

    _netplan(host, path, node, "--remove")
    assert _state(host) == before
    assert _netplan(host, path, node, "--remove").strip() == "keepsrc netplan: already removed; nothing changed"


@pytest.mark.parametrize("placement", ["local", "gateway"])
def test_udp_apply_twice_leaves_one_copy_and_remove_restores_a_fresh_namespace(
        host: NetNs, tmp_path: Path, placement: str) -> None:
    if placement == "local":  # the SIP server on 127.0.0.1 beside Envoy: route_localnet too
        path, node, chain, localnet = EXAMPLES / "sip-udp.yaml", "svc-b", "KEEPSRC-OUTPUT", True
    else:
        path, node, chain, localnet = _write(tmp_path, UDP_GATEWAY_YAML), "gateway", "KEEPSRC-PREROUTING", False
    before = _state(host)
    _netplan(host, path, node, "--apply")
    assert _netplan(host, path, node, "--apply").strip() == "keepsrc netplan: already applied; nothing changed"
    applied = _state(host)
    families = ("iptables-save", "ip6tables-save") if placement == "gateway" else ("iptables-save",)
    for save in families:
        assert _count(applied[save], r"^-A KEEPSRC-OUTPUT .*-p udp -m udp --dport \d+ -m addrtype ! --src-type LOCAL"
                                     r" .*-j CONNMARK --set-xmark 0x539/0xffffffff$") == 1
        assert _count(applied[save], rf"^-A {chain} .*-p udp -m connmark --mark 0x539 .*--restore-mark") == 1
        assert _count(applied[save], r"^-A OUTPUT -m comment --comment keepsrc -j KEEPSRC-OUTPUT$") == 1
    if placement == "local":  # the upstream is IPv4 only: no udp rule in the IPv6 table
        assert "-p udp" not in applied["ip6tables-save"]
    for rules in ("ip rule", "ip -6 rule"):
        assert _count(applied[rules], r"fwmark 0x539 .*lookup 133 proto 107$") == 1
    assert applied["route_localnet"] == ("1" if localnet else "0")

    _netplan(host, path, node, "--remove")
    assert _state(host) == before
    assert _netplan(host, path, node, "--remove").strip() == "keepsrc netplan: already removed; nothing changed"


def test_remove_leaves_what_other_tools_installed(host: NetNs, tmp_path: Path) -> None:
    """A host that already has mangle rules, an identical untagged ip rule and route, and
    route_localnet on (e.g. Istio's own TPROXY setup): keepsrc adds its own and takes only those back."""
    for tables in ("iptables", "ip6tables"):
        host.run(tables, "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "-j", "MARK", "--set-mark", "7")
    host.run("ip", "-4", "rule", "add", "fwmark", "1337", "lookup", "133")
    host.run("ip", "-6", "route", "add", "local", "default", "dev", "lo", "table", "133")
    host.run("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
    before = _state(host)
    path = EXAMPLES / "inner-tcp.yaml"
    _netplan(host, path, "svc-b", "--apply")
    _netplan(host, path, "svc-b", "--apply")
    applied = _state(host)
    assert _count(applied["ip rule"], r"fwmark 0x539 lookup 133") == 2  # the other tool's and keepsrc's
    assert _count(applied["ip -6 route"], r"^local default dev lo table 133") == 1  # already there: kept
    _netplan(host, path, "svc-b", "--remove")
    assert _state(host) == before


def test_apply_converges_when_the_plan_changes(host: NetNs, tmp_path: Path) -> None:
    before = _state(host)
    _netplan(host, EXAMPLES / "inner-tcp.yaml", "svc-b", "--apply")
    changes = _netplan(host, _gateway_file(tmp_path), "gateway", "--apply")
    assert "sysctl net.ipv4.conf.all.route_localnet=0 (restored)" in changes
    now = _state(host)
    assert _count(now["ip rule"], r"fwmark") == 1 and "iif eth1" in now["ip rule"]
    assert "route_localnet" not in now["iptables-save"]  # the 127/8 guard went with the sysctl
    _netplan(host, _gateway_file(tmp_path), "gateway", "--remove")
    assert _state(host) == before
