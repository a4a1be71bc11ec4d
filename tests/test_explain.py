"""`keepsrc explain`: one topology per way of losing the client address, each with its exact finding."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keepsrc.explain import Finding, Severity, Walker, explain
from keepsrc.topology import check_topology_text

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.yaml"))

# Two hops: edge (a tcp or http listener) -> service "next" -> hop (a listener on another proxy)
# -> service "app" -> a backend. Each case fills in the knobs that break (or keep) the address.
TWO_HOPS = """
apiVersion: keepsrc/v1
services:
  next:
    endpoints: ["198.18.4.2:15006"]
    {next_service}
  app:
    endpoints: ["{app_endpoint}"]
    {app_service}
proxies:
  edge:
    listeners:
      - name: in
        address: 198.18.2.2:9000
        protocol: {protocol}
        {edge_listener}
  hop:
    listeners:
      - name: inbound
        address: 198.18.4.2:15006
        protocol: {protocol}
        {hop_listener}
"""


def _topology(protocol: str = "tcp", next_service: str = "", app_service: str = "", edge_listener: str = "",
              hop_listener: str = "", app_endpoint: str = "127.0.0.1:9000") -> str:
    if protocol == "tcp":
        edge_listener = "service: next\n        " + edge_listener
        hop_listener = "service: app\n        " + hop_listener
    else:
        edge_listener = "routes: [{prefix: /, service: next}]\n        " + edge_listener
        hop_listener = "routes: [{prefix: /, service: app}]\n        " + hop_listener
    return TWO_HOPS.format(protocol=protocol, next_service=next_service, app_service=app_service,
                           edge_listener=edge_listener, hop_listener=hop_listener, app_endpoint=app_endpoint)


CASES: dict[str, tuple[str, Severity, str, str]] = {
    # name: (topology, severity, where, message fragment)
    "proxy-sent-not-accepted": (
        _topology(next_service="send_proxy_protocol: v2", hop_listener="original_src: {placement: local}"),
        Severity.LOST, "hop/inbound", "sends a PROXY protocol header but this listener does not accept one",
    ),
    "proxy-accepted-not-sent": (
        _topology(hop_listener="accept_proxy_protocol: true"),
        Severity.LOST, "hop/inbound", "drops the connection",
    ),
    "proxy-accepted-optional-not-sent": (
        _topology(hop_listener="accept_proxy_protocol: {optional: true}"),
        Severity.LOST, "hop/inbound", "connections without it pass, but the address they carry is the sender's",
    ),
    "trusted-hops-too-high": (
        _topology("http", edge_listener="xff: {use_remote_address: true}",
                  hop_listener="xff: {use_remote_address: true, trusted_hops: 2}"),
        Severity.LOST, "hop/inbound", "an address the client wrote itself is trusted",
    ),
    "trusted-hops-too-low": (
        _topology("http", edge_listener="xff: {use_remote_address: true}",
                  hop_listener="xff: {use_remote_address: true, trusted_hops: 0}"),
        Severity.LOST, "hop/inbound", "the address taken as the client is a proxy's",
    ),
    "original-src-without-placement": (
        _topology(edge_listener="original_src: true", next_service=""),
        Severity.LOST, "edge/in", "original_src without a placement",
    ),
    "original-src-local-but-upstream-remote": (
        _topology(edge_listener="original_src: {placement: local}"),
        Severity.LOST, "edge/in", "placement local, but 'next' has endpoints on other hosts (198.18.4.2:15006)",
    ),
    "original-src-with-send-proxy-protocol": (
        _topology(next_service="send_proxy_protocol: v2", hop_listener="accept_proxy_protocol: true",
                  edge_listener="original_src: {placement: gateway, upstream_interface: eth1}"),
        Severity.WARNING, "edge/in", "one upstream connection pool per client address",
    ),
    "deny-from-after-the-address-is-lost": (
        _topology(hop_listener="deny_from: [198.18.0.10]"),
        Severity.LOST, "hop/inbound", "deny_from 198.18.0.10/32 here would match a proxy's address",
    ),
    "sticky-after-the-address-is-lost": (
        _topology(app_service="sticky: client_ip"),
        Severity.LOST, "app", "every client lands on the same backend",
    ),
    "nothing-carries-it-to-the-backend": (
        _topology(next_service="send_proxy_protocol: v2", hop_listener="accept_proxy_protocol: true"),
        Severity.LOST, "hop/inbound", "nothing carries the client address from hop/inbound to 'app'",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_each_way_of_losing_the_address_is_named(case: str) -> None:
    text, severity, where, fragment = CASES[case]
    topology, diagnostics = check_topology_text(textwrap.dedent(text), f"{case}.yaml")
    assert topology is not None, [str(d) for d in diagnostics]
    findings = [f for path in explain(topology) for f in path.findings]
    matching = [f for f in findings if f.severity is severity and f.where == where and fragment in f.message]
    assert matching, f"no {severity} at {where} with {fragment!r}; got {findings}"


def test_a_path_that_keeps_the_address_has_no_findings() -> None:
    text = _topology(next_service="send_proxy_protocol: v2",
                     hop_listener="accept_proxy_protocol: true\n        original_src: {placement: local}")
    topology, _ = check_topology_text(text, "kept.yaml")
    assert topology is not None
    (path,) = explain(topology)
    assert path.findings == [] and not path.lost
    assert [s.where for s in path.steps] == ["edge/in", "hop/inbound", "app 127.0.0.1:9000"]


@pytest.mark.parametrize("scenario", EXAMPLES)
def test_every_example_explains_clean(scenario: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "keepsrc", "explain", f"examples/{scenario}.yaml", "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    paths = json.loads(result.stdout)
    assert paths and all(p["kept"] and not p["findings"] for p in paths)


def test_explain_exits_1_and_prints_the_fix_when_lost(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(CASES["proxy-accepted-not-sent"][0])
    result = subprocess.run([sys.executable, "-m", "keepsrc", "explain", str(broken)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "LOST: hop/inbound:" in result.stdout
    assert "fix: set send_proxy_protocol: v2" in result.stdout
    validate = subprocess.run([sys.executable, "-m", "keepsrc", "validate", str(broken)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert validate.returncode == 0  # valid config; the analysis warns
    assert "lost: hop/inbound:" in validate.stderr


def _findings(text: str) -> list[Finding]:
    topology, diagnostics = check_topology_text(textwrap.dedent(text), "topology.yaml")
    assert topology is not None, [str(d) for d in diagnostics]
    return [f for path in explain(topology) for f in path.findings]


# front sends PROXY v2 to zone-router, which forwards plain TCP to worker, which has original_src.
ZONE_ROUTER = """
apiVersion: keepsrc/v1
services:
  zone:
    endpoints: ["198.18.3.2:9000"]
    send_proxy_protocol: v2
  work:
    endpoints: ["198.18.4.2:9000"]
  app:
    endpoints: ["127.0.0.1:9000"]
proxies:
  front:
    listeners:
      - {name: in, address: 198.18.2.2:9000, protocol: tcp, service: zone}
  zone-router:
    listeners:
      - {name: in, address: 198.18.3.2:9000, protocol: tcp, service: work, accept_proxy_protocol: true}
  worker:
    listeners:
      - {name: in, address: 198.18.4.2:9000, protocol: tcp, service: app, original_src: {placement: local}}
"""


def test_the_hop_that_drops_the_address_is_blamed_not_the_one_after_it() -> None:
    topology, _ = check_topology_text(ZONE_ROUTER, "zone.yaml")
    assert topology is not None
    (path,) = explain(topology)
    assert path.lost
    assert [(s.where, s.kept) for s in path.steps] == [
        ("front/in", True), ("zone-router/in", True), ("worker/in", False), ("app 127.0.0.1:9000", False),
    ]
    assert path.steps[2].text == "client address already lost at zone-router/in"
    # worker already has original_src: the fix is on zone-router's side of the hop.
    assert path.findings == [Finding(
        Severity.LOST, "zone-router/in",
        "nothing carries the client address from zone-router/in to 'work' (198.18.4.2:9000)",
        "set send_proxy_protocol: v2 on service 'work' and accept_proxy_protocol: true on worker/in, "
        "or original_src (with a placement) on zone-router/in",
    )]


DROPPED = Finding(
    Severity.LOST, "edge/in", "nothing carries the client address from edge/in to 'next' (198.18.4.2:15006)",
    "set send_proxy_protocol: v2 on service 'next' and accept_proxy_protocol: true on hop/inbound, "
    "or original_src (with a placement) on edge/in",
)


def test_a_rule_behind_a_first_hop_that_drops_the_address_names_both() -> None:
    assert _findings(_topology(hop_listener="deny_from: [198.18.0.10]")) == [DROPPED, Finding(
        Severity.LOST, "hop/inbound",
        "deny_from 198.18.0.10/32 here would match a proxy's address, not the client's: "
        "the client address is lost at edge/in",
        "carry the client address to hop/inbound: fix the loss at edge/in (see its finding)",
    )]


def test_sticky_behind_a_first_hop_that_drops_the_address_names_both() -> None:
    assert _findings(_topology(app_service="sticky: client_ip")) == [DROPPED, Finding(
        Severity.LOST, "app",
        "sticky: client_ip on 'app' hashes a proxy's address at hop/inbound: every client lands on the same "
        "backend; the client address is lost at edge/in",
        "carry the client address to hop/inbound: fix the loss at edge/in (see its finding)",
    )]


def test_a_rule_on_the_direct_peer_is_meant_for_the_proxy_in_front() -> None:
    text = _topology(hop_listener="allow_from: [198.18.2.2]\n        match: direct_peer")
    assert _findings(text) == [DROPPED]


def _tiers(tiers: int, width: int, plain: str = "") -> str:
    """`tiers` tiers of `width` proxies; each tier's service (PROXY v2) lists every proxy of the next
    tier, the last one a backend. Every listener accepts PROXY protocol except the proxy `plain`."""
    lines = ["apiVersion: keepsrc/v1", "services:"]
    for tier in range(1, tiers + 1):
        last = tier == tiers
        endpoints = ['"10.99.0.1:8080"'] if last else [f'"10.{tier + 1}.0.{i + 1}:9000"' for i in range(width)]
        lines += [f"  {'app' if last else f'tier{tier}'}:", f"    endpoints: [{', '.join(endpoints)}]",
                  "    send_proxy_protocol: v2"]
    lines.append("proxies:")
    for tier in range(1, tiers + 1):
        for i in range(width):
            accept = "" if f"t{tier}-p{i}" == plain else ", accept_proxy_protocol: true"
            service = "app" if tier == tiers else f"tier{tier}"
            listener = f"name: in, address: 10.{tier}.0.{i + 1}:9000, protocol: tcp, service: {service}{accept}"
            lines += [f"  t{tier}-p{i}:", "    listeners:", f"      - {{{listener}}}"]
    return "\n".join(lines) + "\n"


def test_seven_tiers_of_eight_proxies_are_summarized_per_start() -> None:
    topology, _ = check_topology_text(_tiers(7, 8), "tiers.yaml")
    assert topology is not None
    walker = Walker(topology)
    paths = walker.explain()
    assert [p.start for p in paths] == [f"t1-p{i}/in" for i in range(8)]
    for path in paths:
        assert (path.paths, path.lost_paths, path.findings) == (8**6, 0, [])
        # The start, one line per tier behind it, one outcome.
        tiers_behind = [f"t{t}-p0/in, t{t}-p1/in and 6 more" for t in range(2, 8)]
        assert [s.where for s in path.steps] == [path.start, *tiers_behind, "app 10.99.0.1:8080"]
        assert [s.paths for s in path.steps if s.outcome] == [8**6]
    # Each listener evaluated once, however many paths run through it.
    assert walker.hop_evaluations == 7 * 8


def test_the_work_grows_with_the_listeners_not_the_paths() -> None:
    evaluations = {}
    for tiers in (7, 14):
        topology, _ = check_topology_text(_tiers(tiers, 8), "tiers.yaml")
        assert topology is not None
        walker = Walker(topology)
        assert {p.paths for p in walker.explain()} == {8 ** (tiers - 1)}
        evaluations[tiers] = walker.hop_evaluations
    assert evaluations == {7: 56, 14: 112}


def test_one_proxy_of_a_fleet_losing_the_address_is_counted_and_named(tmp_path: Path) -> None:
    topology, _ = check_topology_text(_tiers(7, 8, plain="t4-p3"), "tiers.yaml")
    assert topology is not None
    path = explain(topology, "t1-p0/in")[0]
    # Paths through t4-p3: 8 choices in each of tiers 2, 3, 5, 6 and 7 but one in tier 4.
    assert (path.paths, path.lost_paths) == (8**6, 8**5)
    assert [(s.kept, s.paths) for s in path.steps if s.outcome] == [(True, 8**6 - 8**5), (False, 8**5)]
    assert path.findings == [Finding(
        Severity.LOST, "t4-p3/in",
        "service 'tier3' sends a PROXY protocol header but this listener does not accept one: "
        "the header reaches the application as garbage",
        "set accept_proxy_protocol: true on t4-p3/in, or stop sending it",
    )]
    file = tmp_path / "tiers.yaml"
    file.write_text(_tiers(7, 8, plain="t4-p3"))
    result = subprocess.run([sys.executable, "-m", "keepsrc", "explain", str(file)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "t1-p0/in: LOST on 32,768 of 262,144 paths\n" in result.stdout
    assert "LOST app 10.99.0.1:8080: backend sees a proxy's address, not the client's (lost at t4-p3/in) " \
           "(32,768 paths)\n" in result.stdout
