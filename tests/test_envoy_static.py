"""A real Envoy accepts what keepsrc renders, and carries traffic with the client address kept."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from keepsrc.cli import main
from keepsrc.demo.backends import HttpBackend, TcpBackend, proxy_v2_header
from keepsrc.snapshots.bootstrap import static_bootstrap
from keepsrc.snapshots.render import to_dict
from keepsrc.topology import (
    AcceptProxyProtocol,
    Listener,
    Protocol,
    Proxy,
    ProxyProtocolVersion,
    Route,
    Service,
    SocketAddress,
    Topology,
    Xff,
    load_topology,
)
from tests.support.envoy import Envoy, envoy_path, free_port
from tests.test_golden import CASES

STATIC_CASES = [(source, node) for source, node, static in CASES if static]


def _envoy_check(config: dict[str, Any], path: Path, mode: str) -> None:
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [envoy_path(), "--mode", mode, "--disable-hot-restart", "-c", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "critical" not in result.stderr, result.stderr[-3000:]


def _has_proxy_protocol_health_check(cluster: dict[str, Any]) -> bool:
    return any("proxy_protocol_config" in hc.get("tcp_health_check", {}) for hc in cluster.get("health_checks", []))


@pytest.mark.parametrize(("source", "node"), STATIC_CASES, ids=[f"{s.stem}-{n}" for s, n in STATIC_CASES])
def test_envoy_validates_static_render(tmp_path: Path, source: Path, node: str) -> None:
    config = to_dict(static_bootstrap(load_topology(source), node, SocketAddress("127.0.0.1", 0)))
    clusters = config["static_resources"]["clusters"]
    # Envoy 1.40's --mode validate segfaults on a TCP health check with proxy_protocol_config
    # (it runs fine for real), so such clusters are initialised for real instead: init_only
    # builds every cluster, and without listeners it binds nothing.
    real = [c for c in clusters if _has_proxy_protocol_health_check(c)]
    if real:
        _envoy_check({**config, "static_resources": {"clusters": real}}, tmp_path / "clusters.json", "init_only")
        config["static_resources"]["clusters"] = [
            {**c, "health_checks": []} if c in real else c for c in clusters
        ]
    _envoy_check(config, tmp_path / "envoy.json", "validate")


def test_envoy_rejects_what_it_should(tmp_path: Path) -> None:
    """The validation check above can fail: a broken config is refused by `envoy --mode validate`."""
    config = tmp_path / "envoy.yaml"
    bootstrap = to_dict(static_bootstrap(load_topology("examples/quickstart.yaml"), "ingress",
                                         SocketAddress("127.0.0.1", 0)))
    http_in = bootstrap["static_resources"]["listeners"][1]
    route = http_in["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
    route["route"]["cluster"] = "nope"
    config.write_text(json.dumps(bootstrap))
    result = subprocess.run(
        [envoy_path(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "unknown cluster 'nope'" in result.stderr


@pytest.fixture
def traffic_setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    """One static Envoy: a PROXY-v2-accepting TCP listener sending PROXY v1 upstream, and an HTTP
    listener that accepts PROXY v2 and appends the client to X-Forwarded-For."""
    tcp_backend = TcpBackend(name="tcp")
    http_backend = HttpBackend(name="http")
    tcp_port, http_port = free_port(), free_port()
    topology = Topology(
        services={
            "tcp-app": Service("tcp-app", (SocketAddress("127.0.0.1", tcp_backend.port),),
                               send_proxy_protocol=ProxyProtocolVersion.V1),
            "http-app": Service("http-app", (SocketAddress("127.0.0.1", http_backend.port),)),
        },
        proxies={
            "ingress": Proxy("ingress", (
                Listener("tcp-in", SocketAddress("127.0.0.1", tcp_port), Protocol.TCP, service="tcp-app",
                         accept_proxy_protocol=AcceptProxyProtocol(optional=True)),
                Listener("http-in", SocketAddress("127.0.0.1", http_port), Protocol.HTTP,
                         routes=(Route("/", "http-app"),), accept_proxy_protocol=AcceptProxyProtocol(),
                         xff=Xff(use_remote_address=True)),
            )),
        },
    )
    config = to_dict(static_bootstrap(topology, "ingress", SocketAddress("127.0.0.1", 0)))
    envoy = Envoy(config, tmp_path).start()
    try:
        envoy.wait_ready()
        yield tcp_port, http_port, tcp_backend
    finally:
        envoy.stop()
        tcp_backend.close()
        http_backend.close()


def _tcp_exchange(port: int, payload: bytes) -> bytes:
    """Send, then read until the far side closes (a client that half-closes at once would be
    reset by Envoy's listener filters, which take an early FIN as an error)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(payload)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_static_envoy_keeps_client_address_over_tcp(traffic_setup) -> None:  # type: ignore[no-untyped-def]
    tcp_port, _, backend = traffic_setup
    # A load balancer in front says the client is 198.18.0.10; Envoy re-sends that upstream as PROXY v1.
    reply = _tcp_exchange(tcp_port, proxy_v2_header("198.18.0.10", "198.18.2.2", 40000, 9000) + b"hello\n")
    assert reply == b"backend:tcp client:198.18.0.10 hello\n"
    assert backend.seen[-1].proxy_header is not None
    assert backend.seen[-1].proxy_header.startswith("PROXY TCP4 198.18.0.10 ")
    # optional: true lets a direct client through, and then the direct peer is the client.
    assert _tcp_exchange(tcp_port, b"direct\n") == b"backend:tcp client:127.0.0.1 direct\n"


def test_static_envoy_keeps_client_address_over_http(traffic_setup) -> None:  # type: ignore[no-untyped-def]
    _, http_port, _ = traffic_setup
    request = b"GET /hello HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
    reply = _tcp_exchange(http_port, proxy_v2_header("198.18.0.11", "198.18.2.2", 40001, 8000) + request)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    seen = json.loads(body)
    assert seen["backend"] == "http"
    assert seen["headers"]["x-forwarded-for"] == "198.18.0.11"
    # Without the PROXY header the listener (optional: false) refuses the connection.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=5).read()


@pytest.mark.parametrize("xds", ["127.0.0.1:18000", "keepsrc.internal:18000", "unix:/run/keepsrc/xds.sock"])
@pytest.mark.parametrize(("api", "transport"), [("sotw", "ads"), ("delta", "ads"), ("sotw", "per-type"),
                                                ("delta", "per-type")])
def test_envoy_validates_every_bootstrap_flavour(tmp_path: Path, capsys: pytest.CaptureFixture[str], xds: str,
                                                 api: str, transport: str) -> None:
    assert main(["bootstrap", "--node", "ingress", "--cluster", "fleet", "--xds", xds, "--admin", "127.0.0.1:0",
                 "--api", api, "--transport", transport, "--format", "json"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["node"] == {"id": "ingress", "cluster": "fleet"}
    _envoy_check(config, tmp_path / "bootstrap.json", "validate")


def test_quickstart_example_carries_traffic_as_rendered(tmp_path: Path) -> None:
    """The built-in example exactly as `keepsrc render --static` prints it, on its own ports."""
    echo, web = TcpBackend("127.0.0.1", 9000, name="echo"), HttpBackend("127.0.0.1", 8080, name="web")
    try:
        config = to_dict(static_bootstrap(load_topology("examples/quickstart.yaml"), "ingress",
                                          SocketAddress("127.0.0.1", 0)))
        with Envoy(config, tmp_path) as envoy:
            envoy.wait_ready()
            # tcp-in sends a PROXY v2 header naming the client; the echo backend reads it.
            assert _tcp_exchange(10000, b"hi\n") == b"backend:echo client:127.0.0.1 hi\n"
            assert echo.seen[-1].proxy_header is not None and echo.seen[-1].proxy_header.startswith("v2 127.0.0.1 ")
            seen = json.loads(urllib.request.urlopen("http://127.0.0.1:10080/", timeout=5).read())
            assert seen["backend"] == "web"
            assert "x-forwarded-for" in seen["headers"]  # http-in appends the client (xff)
    finally:
        echo.close()
        web.close()
