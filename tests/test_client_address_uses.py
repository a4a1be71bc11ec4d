"""What the client address is for, on a real Envoy: allow/deny, sticky sessions, access logs.

Each client is told apart by the address a PROXY v2 header (or a trusted X-Forwarded-For)
carries, as a load balancer in front would send it; the rules must act on that address, not on
the loopback peer that actually connects. The netns + HAProxy versions of these run in
tests/test_scenarios_netns.py.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path

import pytest

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
)
from keepsrc.topology.model import PeerMatch, Sticky
from tests.support.envoy import Envoy, free_port

# Backends listen on random ports, so the hash ring differs from run to run; with 12 clients the
# chance that all land on one of 3 backends by luck (3 ** -11) is negligible.
CLIENTS = [f"198.18.0.{10 + i}" for i in range(12)]
DENIED = "198.18.0.10"


@dataclass
class Setup:
    ports: dict[str, int]
    tcp_backends: list[TcpBackend]
    access_log: Path
    envoy: Envoy


def _listener(name: str, protocol: Protocol, **kwargs: object) -> Listener:
    return Listener(name, SocketAddress("127.0.0.1", free_port()), protocol, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("uses")
    tcp_backends = [TcpBackend(name=f"b{i}") for i in range(3)]
    http_backends = [HttpBackend(name=f"h{i}") for i in range(3)]
    access_log = tmp / "access.log"
    services = {
        "tcp-app": Service("tcp-app", (SocketAddress("127.0.0.1", tcp_backends[0].port),),
                           send_proxy_protocol=ProxyProtocolVersion.V2),
        "tcp-sticky": Service("tcp-sticky", tuple(SocketAddress("127.0.0.1", b.port) for b in tcp_backends),
                              sticky=Sticky.CLIENT_IP),
        "http-sticky": Service("http-sticky", tuple(SocketAddress("127.0.0.1", b.port) for b in http_backends),
                               sticky=Sticky.CLIENT_IP),
    }
    pp = AcceptProxyProtocol()
    deny = (ip_network(f"{DENIED}/32"),)
    listeners = [
        _listener("tcp-deny", Protocol.TCP, service="tcp-app", accept_proxy_protocol=pp, deny_from=deny,
                  access_log=str(access_log)),
        _listener("tcp-deny-direct", Protocol.TCP, service="tcp-app", accept_proxy_protocol=pp,
                  deny_from=(ip_network("127.0.0.0/8"),), match=PeerMatch.DIRECT_PEER),
        _listener("tcp-allow", Protocol.TCP, service="tcp-app", accept_proxy_protocol=pp,
                  allow_from=(ip_network("198.18.0.0/24"),), deny_from=deny),
        _listener("http-deny", Protocol.HTTP, routes=(Route("/", "http-sticky"),), accept_proxy_protocol=pp,
                  deny_from=deny, xff=Xff(use_remote_address=True), access_log=str(access_log)),
        _listener("http-xff", Protocol.HTTP, routes=(Route("/", "http-sticky"),), deny_from=deny,
                  xff=Xff(use_remote_address=True, trusted_hops=1)),
        _listener("tcp-sticky", Protocol.TCP, service="tcp-sticky", accept_proxy_protocol=pp),
        _listener("http-external", Protocol.HTTP, routes=(Route("/", "http-sticky"),), xff=Xff()),
        _listener("http-internal", Protocol.HTTP, routes=(Route("/", "http-sticky"),),
                  xff=Xff(internal_cidrs=(ip_network("127.0.0.0/8"),))),
    ]
    topology = Topology(services=services, proxies={"edge": Proxy("edge", tuple(listeners))})
    envoy = Envoy(to_dict(static_bootstrap(topology, "edge", SocketAddress("127.0.0.1", 0))), tmp).start()
    try:
        envoy.wait_ready()
        yield Setup({lst.name: lst.address.port for lst in listeners}, tcp_backends, access_log, envoy)
    finally:
        envoy.stop()
        for backend in tcp_backends:
            backend.close()
        for http_backend in http_backends:
            http_backend.close()


def _exchange(port: int, payload: bytes) -> bytes:
    """Send, read until the far side closes; b'' means the connection was closed on us."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(payload)
        chunks = []
        try:
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def _via_lb(client: str, port: int, payload: bytes) -> bytes:
    return _exchange(port, proxy_v2_header(client, "198.18.2.2", 40000, 9000) + payload)


def _http(client: str, port: int, headers: str = "") -> tuple[int, dict[str, object]]:
    request = f"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n{headers}\r\n".encode()
    raw = _via_lb(client, port, request) if client else _exchange(port, request)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, (json.loads(body) if status == 200 else {})


def _seen_clients(backend: TcpBackend) -> list[str]:
    return [s.proxy_header.split()[1] for s in backend.seen if s.proxy_header]


def test_deny_from_refuses_the_original_client_not_the_load_balancer(setup: Setup) -> None:
    port = setup.ports["tcp-deny"]
    before = len(setup.tcp_backends[0].seen)
    assert _via_lb(DENIED, port, b"hi\n") == b""
    # Refused before any upstream connection: the backend saw nothing for the denied client.
    assert len(setup.tcp_backends[0].seen) == before
    assert _via_lb("198.18.0.11", port, b"hi\n") == b"backend:b0 client:198.18.0.11 hi\n"
    assert _seen_clients(setup.tcp_backends[0])[-1] == "198.18.0.11"
    assert setup.envoy.stat("tcp-deny.rbac.denied") == 1


def test_direct_peer_match_sees_the_load_balancer(setup: Setup) -> None:
    """The negative case: a rule on the direct peer matches the LB's address for every client."""
    port = setup.ports["tcp-deny-direct"]
    assert _via_lb("198.18.0.11", port, b"hi\n") == b""
    assert _via_lb("198.18.0.12", port, b"hi\n") == b""


def test_allow_from_with_overlapping_deny(setup: Setup) -> None:
    port = setup.ports["tcp-allow"]
    assert _via_lb("198.18.0.12", port, b"ok\n").startswith(b"backend:b0 client:198.18.0.12")
    assert _via_lb(DENIED, port, b"no\n") == b""  # in allow_from and deny_from: deny wins
    assert _via_lb("198.18.1.1", port, b"no\n") == b""  # outside allow_from


def test_http_deny_is_a_403_for_the_proxied_client(setup: Setup) -> None:
    port = setup.ports["http-deny"]
    assert _http(DENIED, port)[0] == 403
    status, seen = _http("198.18.0.11", port)
    assert status == 200
    assert seen["headers"]["x-forwarded-for"] == "198.18.0.11"  # type: ignore[index]


def test_http_deny_uses_the_trusted_xff_client(setup: Setup) -> None:
    port = setup.ports["http-xff"]
    assert _http("", port, f"X-Forwarded-For: {DENIED}\r\n")[0] == 403
    assert _http("", port, "X-Forwarded-For: 198.18.0.11\r\n")[0] == 200


def test_sticky_tcp_one_backend_per_client(setup: Setup) -> None:
    port = setup.ports["tcp-sticky"]
    landed: dict[str, Counter[bytes]] = {}
    for client in CLIENTS:
        landed[client] = Counter(_via_lb(client, port, b"x\n").split()[0] for _ in range(20))
    assert all(len(backends) == 1 for backends in landed.values()), landed
    assert len({next(iter(b)) for b in landed.values()}) > 1, f"every client on one backend: {landed}"


def test_sticky_http_follows_the_trusted_xff_client(setup: Setup) -> None:
    """All requests come from one loopback peer; only X-Forwarded-For tells the clients apart."""
    port = setup.ports["http-xff"]
    landed = {
        client: Counter(_http("", port, f"X-Forwarded-For: {client}\r\n")[1]["backend"] for _ in range(20))
        for client in CLIENTS[1:]
    }
    assert all(len(backends) == 1 for backends in landed.values()), landed
    assert len({next(iter(b)) for b in landed.values()}) > 1, f"every client on one backend: {landed}"


def test_loopback_peers_are_external_unless_internal_cidrs_say_otherwise(setup: Setup) -> None:
    """Envoy 1.40 counts no peer as internal by default, loopback included: it names the client in
    x-envoy-external-address. xff.internal_cidrs makes the same peer internal."""
    _, external = _http("", setup.ports["http-external"], "x-envoy-external-address: 198.18.9.9\r\n")
    assert external["headers"]["x-envoy-external-address"] == "127.0.0.1"  # type: ignore[index]
    assert "x-envoy-internal" not in external["headers"]  # type: ignore[operator]
    _, internal = _http("", setup.ports["http-internal"])
    assert internal["headers"]["x-envoy-internal"] == "true"  # type: ignore[index]
    assert "x-envoy-external-address" not in internal["headers"]  # type: ignore[operator]


def test_access_log_shows_client_and_direct_peer(setup: Setup) -> None:
    _via_lb("198.18.0.13", setup.ports["tcp-deny"], b"log me\n")
    _http("198.18.0.14", setup.ports["http-deny"])
    setup.envoy.admin("/reopen_logs", method="POST")  # flush buffered access logs
    setup.envoy.wait_until(
        lambda: any("198.18.0.14" in line for line in setup.access_log.read_text().splitlines()), what="access log"
    )
    entries = [json.loads(line) for line in setup.access_log.read_text().splitlines()]
    tcp = next(e for e in entries if e["client"].startswith("198.18.0.13:"))
    http = next(e for e in entries if e["client"].startswith("198.18.0.14:"))
    for entry in (tcp, http):
        assert entry["direct_peer"].startswith("127.0.0.1:")
        assert entry["upstream_host"].startswith("127.0.0.1:")
    assert tcp["stat_prefix"] == "tcp-deny"
    assert http["response_code"] == 200
    assert http["x_forwarded_for"] == "198.18.0.14"
