"""Demo rows for replicas: etcd, two `keepsrc serve --store etcd://...` replicas and an Envoy whose
bootstrap lists both, on loopback (the client address plays no part here, so no namespaces). xDS is
mutual TLS, as in every scenario: the Envoy has the ingress's certificate; health and CSDS are asked
with the admin's.

A push reaches both replicas and the Envoy; SIGKILL of the replica the Envoy is on is a non-event
for it: no failed connection while it moves, nothing applied.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keepsrc.demo.backends import tcp_first_word
from keepsrc.demo.envoy import Envoy, free_port
from keepsrc.demo.netns import stop_processes, wait_for
from keepsrc.demo.xds_mtls import SERVER_NAME, XdsPki
from keepsrc.server.status import fetch_replica
from keepsrc.snapshots.bootstrap import xds_bootstrap
from keepsrc.snapshots.render import to_dict
from keepsrc.topology import SocketAddress

if TYPE_CHECKING:
    from keepsrc.demo.scenarios import Demo, Row

NAME = "11 replicas on etcd"
# What moves when Envoy applies anything from its control plane.
UPDATES = ("cluster_manager.cds.update_success", "listener_manager.lds.update_success",
           "listener_manager.listener_modified", "listener_manager.listener_added",
           "cluster_manager.cluster_modified", "cluster_manager.cluster_added")


def _topology(listen: int, backend: str, ports: dict[str, int]) -> str:
    return f"""apiVersion: keepsrc/v1
services:
  t1: {{endpoints: ["127.0.0.1:{ports['t1']}"]}}
  t2: {{endpoints: ["127.0.0.1:{ports['t2']}"]}}
proxies:
  ingress:
    listeners:
      - {{name: tcp-in, address: "127.0.0.1:{listen}", protocol: tcp, service: {backend}}}
"""


def _tcp(port: int) -> str:
    """The first word a demo TCP backend answers through the Envoy ('backend:t1'), or 'refused'."""
    try:
        return tcp_first_word(port) or "refused"
    except OSError:
        return "refused"


def _serving(target: str, pki: XdsPki) -> bool:
    try:
        with grpc.secure_channel(target, pki.credentials(), [("grpc.ssl_target_name_override", SERVER_NAME)]) \
                as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _revision(target: str, pki: XdsPki) -> int | None:
    try:
        return fetch_replica(target, 2, credentials=pki.credentials(), server_name=SERVER_NAME).revision
    except grpc.RpcError:
        return None


def _holds_node(target: str, pki: XdsPki) -> bool:
    try:
        status = fetch_replica(target, 2, credentials=pki.credentials(), server_name=SERVER_NAME)
        return any(c.node.id == "ingress" for c in status.response.config)
    except grpc.RpcError:
        return False


def replicas(demo: Demo) -> list[Row]:
    from keepsrc.demo.scenarios import Row  # scenarios registers this function: imported late

    work = demo.workdir / "replicas"
    work.mkdir(exist_ok=True)
    processes: list[subprocess.Popen[Any]] = []
    envoy: Envoy | None = None

    def start(name: str, *cmd: str) -> subprocess.Popen[Any]:
        with (work / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT)
        processes.append(proc)
        return proc

    try:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise RuntimeError("etcd is not installed (scripts/setup installs it as root)")
        client, peer = free_port(), free_port()
        start("etcd", etcd, "--name", "demo", "--data-dir", str(work / "etcd"),
              "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls",
              f"http://127.0.0.1:{client}", "--listen-peer-urls", f"http://127.0.0.1:{peer}",
              "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
              "--initial-cluster", f"demo=http://127.0.0.1:{peer}")
        store = f"etcd://127.0.0.1:{client}/keepsrc/demo"
        ports = {"t1": free_port(), "t2": free_port()}
        for name, port in ports.items():
            start(name, sys.executable, "-m", "keepsrc.demo.backends", "tcp", f"127.0.0.1:{port}", "--name", name)
        listen = free_port()

        def push(backend: str) -> int:
            path = work / f"topology-{backend}.yaml"
            path.write_text(_topology(listen, backend, ports))
            result = subprocess.run([sys.executable, "-m", "keepsrc", "push", str(path), "--store", store],
                                    capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                raise RuntimeError(f"keepsrc push: {result.stderr}")
            return int(result.stdout.rsplit("at revision ", 1)[1].split()[0])

        def first_push() -> bool:
            try:
                push("t1")
            except RuntimeError:  # etcd still starting
                return False
            return True

        wait_for(first_push, 20, "etcd to take the first push")
        targets = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        pki = XdsPki(work / "pki", ["ingress"])
        pki.write()
        replica_procs = {
            target: start(f"replica-{i}", sys.executable, "-m", "keepsrc", "serve", "--store", store,
                          "--listen", target, *pki.serve_arguments())
            for i, target in enumerate(targets)
        }
        wait_for(lambda: all(_serving(t, pki) for t in targets), 30, "both replicas SERVING")
        addresses = [SocketAddress("127.0.0.1", int(t.rsplit(":", 1)[1])) for t in targets]
        bootstrap = xds_bootstrap("ingress", addresses, SocketAddress("127.0.0.1", 0), tls=pki.envoy_tls("ingress"))
        envoy = Envoy(to_dict(bootstrap), work, name="replicas-ingress")
        envoy.start()
        envoy.wait_ready(timeout=30)
        wait_for(lambda: _tcp(listen) == "backend:t1", 20, "traffic through the Envoy")
        rows = [Row(NAME, "client -> Envoy (bootstrap lists replicas A and B) -> backend", _tcp(listen),
                    "backend:t1")]

        revision = push("t2")
        wait_for(lambda: all(_revision(t, pki) == revision for t in targets) and _tcp(listen) == "backend:t2", 20,
                 "the push on both replicas and the Envoy")
        rows.append(Row(NAME, "  keepsrc push: both replicas at its revision, the Envoy follows",
                        f"{'/'.join(str(_revision(t, pki)) for t in targets)} {_tcp(listen)}",
                        f"{revision}/{revision} backend:t2"))

        on = next(t for t in targets if _holds_node(t, pki))
        other = next(t for t in targets if t != on)
        before = {name: envoy.stat(name) for name in UPDATES}
        failures: list[str] = []
        answers: list[str] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                answer = _tcp(listen)
                (answers if answer == "backend:t2" else failures).append(answer)

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            replica_procs[on].kill()
            replica_procs[on].wait(10)
            wait_for(lambda: _holds_node(other, pki), 30, "the Envoy on the other replica")
            wait_for(lambda: len(answers) > 20, 10, "traffic after the move")
        finally:
            stop.set()
            thread.join(10)
        rows.append(Row(NAME, "  SIGKILL the Envoy's replica: failed connections while it moves to the other",
                        f"{len(failures)} of {len(failures) + len(answers)}",
                        f"0 of {len(failures) + len(answers)}"))
        moved = sum((envoy.stat(name) or 0) - (before[name] or 0) for name in UPDATES)
        rows.append(Row(NAME, "  ... and the config updates Envoy applied for the move", str(moved), "0"))
        return rows
    finally:
        if envoy is not None:
            envoy.stop()
        stop_processes(processes)

