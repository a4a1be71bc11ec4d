"""UDP original_src end to end: SIP over a real Envoy's udp_proxy, and the SIP server sees the client.

A client namespace sends SIP OPTIONS requests (the keepalive a trunk sends) to Envoy's udp
listener in the next namespace; udp_proxy with `use_original_src_ip` forwards them from the
client's own IP; the SIP server (keepsrc.demo.backends' UdpBackend) answers with a SIP 200 OK
whose Via says `received=<the source it saw>`. What a user checks: the answer reaches the
client, and the source in it is the client's own IP. Placements:
- local (examples/sip-udp.yaml as shipped): the SIP server on 127.0.0.1 beside Envoy;
- gateway: the SIP server in a third namespace behind Envoy's host, IPv4 and IPv6.
Without `keepsrc netplan` the server still sees the client, but its answer goes to the client's
IP directly and never comes back; without original_src the server sees Envoy's own address.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepsrc.demo.backends import seen_source
from keepsrc.demo.scenarios import NO_ANSWER
from keepsrc.snapshots.bootstrap import static_bootstrap
from keepsrc.snapshots.render import to_dict
from keepsrc.topology import SocketAddress, Topology, load_topology
from tests.support.envoy import Envoy
from tests.support.netns import GATEWAY_ADDRESSES, Lab, NetNs, gateway_scene, wait_for
from tests.support.netns import netlab_fixture as netlab_fixture  # the `netlab` fixture
from tests.support.strict import require_binary

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SIP_UDP = EXAMPLES / "sip-udp.yaml"
NODE = "svc-b"
LISTENER = "198.18.4.2:5060"
# How long a client keeps retransmitting its OPTIONS before it reports no answer (a bound, not
# an expectation: an answer that comes arrives within the first second or two).
ANSWER_TIMEOUT = "5"
TOOLS = ("iptables", "ip6tables", "iptables-save", "iptables-restore")


@pytest.fixture
def lab(netlab: Lab) -> Lab:
    for tool in TOOLS:
        require_binary(tool)
    return netlab


class SipServer:
    """`python -m keepsrc.demo.backends udp` in a namespace; its log names every source it saw."""

    def __init__(self, ns: NetNs, address: str, log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            ns.popen([sys.executable, "-m", "keepsrc.demo.backends", "udp", address, "--name", "sip-server"],
                     stdout=out, stderr=out)
        wait_for(lambda: "listening" in log.read_text(), 15, f"the SIP server on {address} in {ns}")

    def sources(self) -> list[tuple[str, int]]:
        """(ip, port) of every datagram received, in order."""
        return [(line.split()[1], int(line.split()[2])) for line in self.log.read_text().splitlines()
                if line.startswith("peer ")]

    def ips(self) -> set[str]:
        return {ip for ip, _ in self.sources()}


def ask(client: NetNs, address: str = LISTENER) -> str:
    """One OPTIONS from `client` (retransmitted as SIP does over UDP): the answer's text, or ''."""
    return client.run(sys.executable, "-m", "keepsrc.demo.backends", "sip-options", address,
                      "--timeout", ANSWER_TIMEOUT, check=False).stdout


def seen(answer: str) -> str:
    """The source the SIP server reported in its answer; NO_ANSWER when none reached the client."""
    if not answer:
        return NO_ANSWER
    assert answer.splitlines()[0] == "SIP/2.0 200 OK", answer
    source = seen_source(answer.encode())
    assert source is not None, answer
    return source


@contextlib.contextmanager
def running_envoy(ns: NetNs, topology: Topology, node: str, workdir: Path) -> Iterator[Envoy]:
    """Envoy with the static config `keepsrc bootstrap` writes for `node`, LIVE, stopped on exit."""
    bootstrap = static_bootstrap(topology, node, SocketAddress("127.0.0.1", 0))
    with Envoy(to_dict(bootstrap), workdir, name=f"envoy-{node}", netns=ns.name) as envoy:
        envoy.wait_ready(timeout=30)
        yield envoy


def netplan(ns: NetNs, path: Path, node: str, flag: str) -> None:
    ns.run(sys.executable, "-m", "keepsrc.netplan", str(path), "--node", node, flag)


def without_original_src(topology: Topology, node: str) -> Topology:
    proxy = topology.proxies[node]
    listeners = tuple(dataclasses.replace(listener, original_src=None) for listener in proxy.listeners)
    return dataclasses.replace(topology, proxies={node: dataclasses.replace(proxy, listeners=listeners)})


# -- local placement: the SIP server beside Envoy (examples/sip-udp.yaml) ---------------------------
CLIENTS = (  # client address, Envoy host's address on that link
    ("198.18.4.1", "198.18.4.2"),
    ("198.18.5.1", "198.18.5.2"),
)


def local_scene(lab: Lab, clients: int = 1) -> tuple[list[NetNs], NetNs]:
    """Client namespaces, each on its own link to the Envoy host (the listener is on the first)."""
    proxy = lab.ns("proxy")
    namespaces = []
    for i, (client_ip, proxy_ip) in enumerate(CLIENTS[:clients]):
        client = lab.ns(f"client{i + 1}")
        lab.link(client, "eth0", f"{client_ip}/24", proxy, f"eth{i}", f"{proxy_ip}/24")
        client.run("ip", "route", "add", "default", "via", proxy_ip)
        namespaces.append(client)
    return namespaces, proxy


def test_sip_server_sees_the_client_only_with_the_netplan(lab: Lab, tmp_path: Path) -> None:
    [client], proxy = local_scene(lab)
    server = SipServer(proxy, "127.0.0.1:5070", tmp_path / "sip-server.log")
    with running_envoy(proxy, load_topology(SIP_UDP), NODE, tmp_path):
        assert seen(ask(client)) == NO_ANSWER, "without the netplan the server's answer must not reach Envoy"
        assert server.ips() == {"198.18.4.1"}, "Envoy did forward from the client's IP; only the answer was lost"

        netplan(proxy, SIP_UDP, NODE, "--apply")
        assert seen(ask(client)) == "198.18.4.1"

        netplan(proxy, SIP_UDP, NODE, "--remove")
        assert seen(ask(client)) == NO_ANSWER, "--remove must take the plan away again"
        assert server.ips() == {"198.18.4.1"}


def test_without_original_src_the_sip_server_sees_envoy(lab: Lab, tmp_path: Path) -> None:
    [client], proxy = local_scene(lab)
    server = SipServer(proxy, "127.0.0.1:5070", tmp_path / "sip-server.log")
    with running_envoy(proxy, without_original_src(load_topology(SIP_UDP), NODE), NODE, tmp_path):
        assert seen(ask(client)) == "127.0.0.1"
    assert server.ips() == {"127.0.0.1"}


def test_two_clients_at_once_are_each_seen_as_themselves(lab: Lab, tmp_path: Path) -> None:
    clients, proxy = local_scene(lab, clients=2)
    server = SipServer(proxy, "127.0.0.1:5070", tmp_path / "sip-server.log")
    with running_envoy(proxy, load_topology(SIP_UDP), NODE, tmp_path):
        netplan(proxy, SIP_UDP, NODE, "--apply")
        answers: dict[str, str] = {}
        barrier = threading.Barrier(len(clients))

        def exchange(client: NetNs) -> None:
            barrier.wait(timeout=30)  # both sessions open and run side by side in Envoy
            answers[client.name] = ask(client)

        threads = [threading.Thread(target=exchange, args=(client,)) for client in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert {name: seen(answer) for name, answer in answers.items()} == {
            client.name: client_ip for client, (client_ip, _) in zip(clients, CLIENTS, strict=True)}
    assert server.ips() == {"198.18.4.1", "198.18.5.1"}


SESSION_CLIENT = r"""
import socket, sys
from keepsrc.demo.backends import sip_options
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((sys.argv[1], int(sys.argv[2])))
sock.settimeout(float(sys.argv[3]))
for _ in sys.stdin:  # one OPTIONS per line the test writes, all from this one socket
    sock.send(sip_options(f"{sys.argv[1]}:{sys.argv[2]}", sock.getsockname()))
    try:
        sock.recv(65535)
        print("answered", flush=True)
    except OSError:
        print("no answer", flush=True)
"""


def test_silence_beyond_idle_timeout_moves_the_session_to_a_new_upstream_port(lab: Lab, tmp_path: Path) -> None:
    """What docs/topology.md warns long SIP dialogs about: after idle_timeout of silence, the same
    client's next datagram is a new Envoy session, from a new upstream port (and it still works)."""
    text = SIP_UDP.read_text()
    assert "idle_timeout: 60m" in text
    short = tmp_path / "sip-udp.yaml"
    short.write_text(text.replace("idle_timeout: 60m", "idle_timeout: 200ms"))
    [client], proxy = local_scene(lab)
    server = SipServer(proxy, "127.0.0.1:5070", tmp_path / "sip-server.log")
    with running_envoy(proxy, load_topology(short), NODE, tmp_path) as envoy:
        netplan(proxy, short, NODE, "--apply")
        host, _, port = LISTENER.rpartition(":")
        session = client.popen([sys.executable, "-c", SESSION_CLIENT, host, port, ANSWER_TIMEOUT],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert session.stdin is not None and session.stdout is not None

        def options() -> str:
            assert session.stdin is not None and session.stdout is not None
            session.stdin.write("\n")
            session.stdin.flush()
            return session.stdout.readline().strip()  # bounded: the client gives up after its timeout

        assert options() == "answered"
        envoy.wait_until(lambda: envoy.stat("udp.sip-trunk.idle_timeout") == 1, 15, "the session's idle timeout")
        assert options() == "answered"
        session.stdin.close()
    [(first_ip, first_port), (second_ip, second_port)] = server.sources()
    assert first_ip == second_ip == "198.18.4.1"
    assert first_port != second_port, "a new session must come from a new upstream socket"


# -- gateway placement: the SIP server is another host behind Envoy's --------------------------------
def bracket(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def gateway_topology(path: Path, family: int) -> Path:
    _, proxy_down, _, server_ip, _ = GATEWAY_ADDRESSES[family]
    path.write_text(f"""\
apiVersion: keepsrc/v1
services:
  sip-server: {{endpoints: ["{bracket(server_ip)}:5060"]}}
proxies:
  gateway:
    listeners:
      - name: sip-trunk
        address: "{bracket(proxy_down)}:5060"
        protocol: udp
        service: sip-server
        original_src: {{placement: gateway, upstream_interface: eth1}}
        idle_timeout: 60m
""")
    return path


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_gateway_sip_server_sees_the_client_only_with_the_netplan(lab: Lab, tmp_path: Path, family: int) -> None:
    client_ip, proxy_down, _, server_ip, _ = GATEWAY_ADDRESSES[family]
    client, proxy, server_ns = gateway_scene(lab, family, "sip")
    server = SipServer(server_ns, f"{bracket(server_ip)}:5060", tmp_path / "sip-server.log")
    path = gateway_topology(tmp_path / "gateway.yaml", family)
    listener = f"{bracket(proxy_down)}:5060"
    with running_envoy(proxy, load_topology(path), "gateway", tmp_path):
        assert seen(ask(client, listener)) == NO_ANSWER, "without the netplan the answer goes to the client's IP"
        assert server.ips() == {client_ip}

        netplan(proxy, path, "gateway", "--apply")
        assert seen(ask(client, listener)) == client_ip
        netplan(proxy, path, "gateway", "--remove")


def test_gateway_without_original_src_the_sip_server_sees_envoy(lab: Lab, tmp_path: Path) -> None:
    client, proxy, server_ns = gateway_scene(lab, 4, "sip")
    server = SipServer(server_ns, "198.18.2.2:5060", tmp_path / "sip-server.log")
    topology = without_original_src(load_topology(gateway_topology(tmp_path / "gateway.yaml", 4)), "gateway")
    with running_envoy(proxy, topology, "gateway", tmp_path):
        assert seen(ask(client, "198.18.1.2:5060")) == "198.18.2.1"
    assert server.ips() == {"198.18.2.1"}


# -- the rows `keepsrc demo` prints ------------------------------------------------------------------
