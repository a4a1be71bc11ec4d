"""original_src end to end: a real Envoy in a network namespace, and the backend sees the client.

Both placements `keepsrc netplan` knows, with real traffic between namespaces:
- local (the talk's sidecar, examples/inner-tcp.yaml as shipped): client ns -> Envoy ns, the
  backend on 127.0.0.1 next to Envoy;
- gateway: client ns -> Envoy ns -> backend ns over a second veth, the backend's default route
  pointing back through Envoy's host.
Each backend tells the client the peer address its accept() returned, which is what a user
checks. Without the plan the connection never reaches the backend (its replies go astray);
without original_src the backend sees Envoy's own address.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepsrc.snapshots.bootstrap import static_bootstrap
from keepsrc.snapshots.render import dump, to_dict
from keepsrc.topology import SocketAddress, Topology, load_topology
from tests.support.envoy import Envoy
from tests.support.netns import GATEWAY_ADDRESSES, Lab, NetNs, gateway_scene, wait_for
from tests.support.netns import netlab_fixture as netlab_fixture  # the `netlab` fixture
from tests.support.strict import require_binary

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PORT = 15006

# Accepts forever; logs each peer (the log is read by the test) and tells the client who it saw.
BACKEND = r"""
import socket, sys
host, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((host, port))
server.listen(16)
with open(log, "a") as out:
    out.write("ready\n")
while True:
    conn, peer = server.accept()
    with open(log, "a") as out:
        out.write(f"peer {peer[0]}\n")
    conn.sendall(f"you are {peer[0]}".encode())
    conn.close()
"""

# Reads until Envoy closes: the backend's answer, or nothing when Envoy could not connect upstream.
CLIENT = r"""
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=15)
conn.settimeout(15)
data = b""
while chunk := conn.recv(4096):
    data += chunk
print(data.decode(), end="")
"""

@pytest.fixture
def lab(netlab: Lab) -> Lab:
    for tool in ("iptables", "ip6tables", "iptables-save", "iptables-restore"):
        require_binary(tool)
    return netlab


class Backend:
    def __init__(self, ns: NetNs, host: str, log: Path) -> None:
        self.log = log
        ns.popen([sys.executable, "-c", BACKEND, host, "9000", str(log)])
        wait_for(lambda: log.exists() and "ready" in log.read_text(), 15, f"backend on {host} in {ns}")

    def peers(self) -> list[str]:
        return [line.split()[1] for line in self.log.read_text().splitlines() if line.startswith("peer ")]


def without_original_src(topology: Topology, node: str) -> Topology:
    proxy = topology.proxies[node]
    listeners = tuple(dataclasses.replace(listener, original_src=None) for listener in proxy.listeners)
    return dataclasses.replace(topology, proxies={node: dataclasses.replace(proxy, listeners=listeners)})


@contextlib.contextmanager
def running_envoy(ns: NetNs, topology: Topology, node: str, workdir: Path) -> Iterator[Envoy]:
    """Envoy with the static config `keepsrc bootstrap` writes for `node`, LIVE, stopped on exit."""
    bootstrap = static_bootstrap(topology, node, SocketAddress("127.0.0.1", 0))
    with Envoy(dump(to_dict(bootstrap), "json"), workdir, name=f"envoy-{node}", netns=ns.name) as envoy:
        envoy.wait_ready(timeout=30)  # the admin API is a unix socket, reachable from outside the namespace
        yield envoy


def ask(client: NetNs, host: str) -> str:
    """What the client reads from Envoy's listener."""
    return client.run(sys.executable, "-c", CLIENT, host, str(PORT)).stdout


def netplan(ns: NetNs, path: Path, node: str, flag: str) -> None:
    ns.run(sys.executable, "-m", "keepsrc.netplan", str(path), "--node", node, flag)


# -- local placement: the talk's sidecar -------------------------------------------------------------
def local_scene(lab: Lab) -> tuple[NetNs, NetNs]:
    client, proxy = lab.ns("client"), lab.ns("proxy")
    lab.link(client, "eth0", "198.18.4.1/24", proxy, "eth0", "198.18.4.2/24")
    client.run("ip", "route", "add", "default", "via", "198.18.4.2")
    return client, proxy


@pytest.mark.parametrize("backend_ip", ["127.0.0.1", "198.18.9.1"], ids=["loopback", "local-address"])
def test_local_backend_sees_the_client_only_with_the_netplan(lab: Lab, tmp_path: Path, backend_ip: str) -> None:
    # examples/inner-tcp.yaml, svc-b: 198.18.4.2:15006 -> 127.0.0.1:9000 with original_src local. An
    # app on another local address needs no route_localnet, so that plan has none: it must work too.
    example = EXAMPLES / "inner-tcp.yaml"
    client, proxy = local_scene(lab)
    if backend_ip != "127.0.0.1":
        text = example.read_text()
        assert '"127.0.0.1:9000"' in text
        example = tmp_path / "inner-tcp.yaml"
        example.write_text(text.replace('"127.0.0.1:9000"', f'"{backend_ip}:9000"'))
        proxy.run("ip", "addr", "add", f"{backend_ip}/32", "dev", "lo")
    backend = Backend(proxy, backend_ip, tmp_path / "backend.log")
    with running_envoy(proxy, load_topology(example), "svc-b", tmp_path):
        assert ask(client, "198.18.4.2") == "", "without the netplan the backend's replies must not reach Envoy"
        assert backend.peers() == []

        netplan(proxy, example, "svc-b", "--apply")
        assert ask(client, "198.18.4.2") == "you are 198.18.4.1"
        assert backend.peers() == ["198.18.4.1"]

        netplan(proxy, example, "svc-b", "--remove")
        assert ask(client, "198.18.4.2") == "", "--remove must take the plan away again"
        assert backend.peers() == ["198.18.4.1"]


def test_local_without_original_src_the_backend_sees_envoy(lab: Lab, tmp_path: Path) -> None:
    client, proxy = local_scene(lab)
    backend = Backend(proxy, "127.0.0.1", tmp_path / "backend.log")
    topology = without_original_src(load_topology(EXAMPLES / "inner-tcp.yaml"), "svc-b")
    with running_envoy(proxy, topology, "svc-b", tmp_path):
        assert ask(client, "198.18.4.2") == "you are 127.0.0.1"
    assert backend.peers() == ["127.0.0.1"]


PROBE = r"""
import socket, sys
try:
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    conn.settimeout(3)
    print(conn.recv(4096).decode(), end="")
except OSError as exc:
    print(f"failed: {exc}", end="")
"""


def test_local_plan_keeps_loopback_services_unreachable_from_the_network(lab: Lab, tmp_path: Path) -> None:
    """route_localnet (needed for a backend on 127.0.0.1) also lets a neighbour reach 127/8 over
    the wire, the kube-proxy CVE-2020-8558 hole; the plan's guard rule closes it again."""
    client, proxy = local_scene(lab)
    # The neighbour sends to 127.0.0.1 via the proxy host: its own local table moves after a
    # rule that routes 127.0.0.1 by the main table, where it points at the proxy.
    client.run("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
    client.run("ip", "rule", "add", "pref", "10", "to", "127.0.0.1", "lookup", "main")
    client.run("ip", "rule", "add", "pref", "100", "lookup", "local")
    client.run("ip", "rule", "del", "pref", "0")
    client.run("ip", "route", "add", "127.0.0.1/32", "via", "198.18.4.2", "dev", "eth0")
    backend = Backend(proxy, "127.0.0.1", tmp_path / "backend.log")

    proxy.run("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")  # the talk's step 3 alone
    assert client.run(sys.executable, "-c", PROBE, "127.0.0.1", "9000").stdout == "you are 198.18.4.1"
    proxy.run("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=0")

    netplan(proxy, EXAMPLES / "inner-tcp.yaml", "svc-b", "--apply")
    assert proxy.run("sysctl", "-n", "net.ipv4.conf.all.route_localnet").stdout.strip() == "1"
    assert client.run(sys.executable, "-c", PROBE, "127.0.0.1", "9000").stdout.startswith("failed")
    assert backend.peers() == ["198.18.4.1"]  # only the unguarded probe got through


# -- gateway placement: the upstream is another host behind Envoy's ----------------------------------
def gateway_topology(path: Path, family: int, original_src: str) -> Path:
    _, proxy_down, _, backend_ip, _ = GATEWAY_ADDRESSES[family]

    def bracket(ip: str) -> str:
        return f"[{ip}]" if family == 6 else ip

    path.write_text(f"""\
apiVersion: keepsrc/v1
services:
  app: {{endpoints: ["{bracket(backend_ip)}:9000"]}}
proxies:
  gateway:
    listeners:
      - name: in
        address: "{bracket(proxy_down)}:{PORT}"
        protocol: tcp
        service: app
        original_src: {original_src}
""")
    return path


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_gateway_backend_sees_the_client_only_with_the_iif_scoped_plan(
        lab: Lab, tmp_path: Path, family: int) -> None:
    client_ip, proxy_down, _, backend_ip, _ = GATEWAY_ADDRESSES[family]
    client, proxy, backend_ns = gateway_scene(lab, family, "backend")
    backend = Backend(backend_ns, backend_ip, tmp_path / "backend.log")
    gateway = gateway_topology(tmp_path / "gateway.yaml", family, "{placement: gateway, upstream_interface: eth1}")
    # The talk's rules as written (what `placement: local` plans) on this host: same Envoy config.
    talk = gateway_topology(tmp_path / "talk.yaml", family, "{placement: local}")
    with running_envoy(proxy, load_topology(gateway), "gateway", tmp_path):
        assert ask(client, proxy_down) == "", "without the netplan the backend's replies go to the client"

        netplan(proxy, talk, "gateway", "--apply")
        assert ask(client, proxy_down) == "", "the talk's literal rules were expected to fail behind a gateway"
        netplan(proxy, talk, "gateway", "--remove")
        assert backend.peers() == []

        netplan(proxy, gateway, "gateway", "--apply")
        assert ask(client, proxy_down) == f"you are {client_ip}"
        assert backend.peers() == [client_ip]
        netplan(proxy, gateway, "gateway", "--remove")


def test_gateway_without_original_src_the_backend_sees_envoy(lab: Lab, tmp_path: Path) -> None:
    client, proxy, backend_ns = gateway_scene(lab, 4, "backend")
    backend = Backend(backend_ns, "198.18.2.2", tmp_path / "backend.log")
    path = gateway_topology(tmp_path / "gateway.yaml", 4, "{placement: gateway, upstream_interface: eth1}")
    topology = load_topology(path)
    with running_envoy(proxy, without_original_src(topology, "gateway"), "gateway", tmp_path):
        assert ask(client, "198.18.1.2") == "you are 198.18.2.1"
    assert backend.peers() == ["198.18.2.1"]
