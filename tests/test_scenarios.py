"""The talk's four scenarios end to end: real Envoys served by `keepsrc serve`, HAProxy, nginx and
backends in network namespaces; every row of `keepsrc demo` must PASS, negatives included. Every
deployment serves xDS over mutual TLS (scenario 12 shows who is served what)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepsrc.demo.cli import render_table, run_scenarios
from keepsrc.demo.hosts import LoopbackNetwork, NamespaceNetwork
from keepsrc.demo.netns import list_namespaces, sweep_leftovers
from keepsrc.demo.scenarios import SCENARIOS, Demo, example
from keepsrc.demo.xds_mtls import health
from tests.support.envoy import envoy_path
from tests.support.strict import require_binary, require_root

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def namespaces() -> Iterator[NamespaceNetwork]:
    require_root()
    for tool in ("ip", "iptables", "haproxy", "nginx"):
        require_binary(tool)
    envoy_path()
    sweep_leftovers()
    network = NamespaceNetwork()
    try:
        yield network
    finally:
        network.close()


@pytest.mark.parametrize("scenario", [s.name for s in SCENARIOS])
def test_scenario_backend_sees_the_client(namespaces: NamespaceNetwork, tmp_path: Path, scenario: str) -> None:
    rows, skips = run_scenarios(namespaces, tmp_path, only=[scenario])
    assert not skips, skips
    assert rows, "the scenario produced no rows"
    if next(s for s in SCENARIOS if s.name == scenario).about_the_address:
        assert any("negative" in r.path for r in rows), "every scenario shows the address lost without keepsrc"
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n" + render_table(rows, skips)


def test_loopback_mode_runs_what_loopback_allows(tmp_path: Path) -> None:
    envoy_path()
    network = LoopbackNetwork()
    try:
        rows, skips = run_scenarios(network, tmp_path)
    finally:
        network.close()
    assert rows and all(r.passed for r in rows), render_table(rows, skips)
    assert {s.scenario for s in skips} == {"1 inner HTTP", "3 inner TCP", "5 deny by client IP",
                                           "6 sticky by client IP", "7 UDP (SIP)"}
    assert all(s.reason for s in skips)


def test_every_deployment_serves_xds_over_mutual_tls(tmp_path: Path) -> None:
    """By default, not only in scenario 12: serve with --tls-cert/--tls-key/--client-ca, each Envoy
    connected over TLS with its own entry's certificate, plaintext refused."""
    envoy_path()
    network = LoopbackNetwork()
    try:
        demo = Demo(network, tmp_path)
        with demo.deploy("mtls-default", example("external-http.yaml"), [("svc-b", "http", "127.0.0.1:8080")]) as d:
            assert d.pki is not None and d.socket_path is not None
            assert sorted(e.name for e in d.envoys) == ["mtls-default-ingress", "mtls-default-svc-b"]
            for envoy in d.envoys:
                assert (envoy.stat("cluster.keepsrc_xds.ssl.handshake") or 0) >= 1, envoy.name
                assert envoy.stat("control_plane.connected_state") == 1, envoy.name
            assert health(d.socket_path, None) == "UNAVAILABLE"
            assert health(d.socket_path, d.pki.credentials(None)) == "UNAVAILABLE"  # no client certificate
            assert health(d.socket_path, d.pki.credentials()) == "SERVING"
    finally:
        network.close()


def test_demo_command_prints_the_table_and_exits_0(tmp_path: Path) -> None:
    envoy_path()
    result = subprocess.run([sys.executable, "-m", "keepsrc", "demo", "--loopback"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 external HTTP" in result.stdout and "PASS" in result.stdout and "FAIL" not in result.stdout
    assert "SKIPPED" in result.stdout  # says what it could not run and why


def test_demo_cleans_up_its_namespaces_on_ctrl_c() -> None:
    require_root()
    require_binary("ip")
    envoy_path()
    # SIGINT as a terminal's Ctrl-C finds it: a shell runs a background job (a CI run started with
    # `&`) with SIGINT ignored, the child would inherit that, and Python then raises no KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "keepsrc", "demo", "--only", "4"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:  # interrupt once Envoys are starting: namespaces exist by then
        if "starting Envoy" in line or time.monotonic() > deadline:
            break
    mine = [n for n in list_namespaces() if n.startswith(f"ks-{proc.pid}-")]
    assert mine, "the demo should have created its namespaces by now"
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert not [n for n in list_namespaces() if n.startswith(f"ks-{proc.pid}-")]
