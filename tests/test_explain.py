"""`keepsrc explain`: one topology per way of losing the client address, each with its exact finding."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keepsrc.explain import Severity, explain
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
        Severity.LOST, "hop/inbound", "allow_from/deny_from here would match a proxy's address",
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
