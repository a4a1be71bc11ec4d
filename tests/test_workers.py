"""`keepsrc serve --workers 2` as an operator runs it, with a real Envoy on each worker: `keepsrc
status` and /metrics show the Envoys of both workers, and a worker killed is started again while
its Envoy reconnects to the port and is sent nothing (Envoy's update counters do not move) and
traffic through both Envoys never fails."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from keepsrc.demo.backends import TcpBackend
from keepsrc.server.status import fetch
from tests.support.envoy import Envoy, envoy_path, free_port
from tests.support.envoy_lab import Traffic, envoy_for, tcp_backend
from tests.support.serve import Serve, until

ROOT = Path(__file__).resolve().parent.parent
PROXIES = ("edge-a", "edge-b")
# What an Envoy's counters say about the config it was sent: none may move when its worker dies.
UPDATE_COUNTERS = ("cluster_manager.cds.update_success", "listener_manager.lds.update_success",
                   "cluster_manager.cds.update_rejected", "listener_manager.lds.update_rejected")
# Placement of a connection on a worker is the kernel's hash: an Envoy restarted this many times
# has 1 in 2**20 chance to land on the same worker each time.
MAX_PLACEMENT_TRIES = 20


class Workers(Serve):
    """`keepsrc serve --workers 2` as a process; its workers found through /proc and its log."""

    def __init__(self, topology: Path, workdir: Path) -> None:
        super().__init__(workdir, str(topology), "--workers", "2", "--debounce-ms", "100")
        until(lambda: self.run_dir is not None, 30, "the supervisor's run directory")
        until(lambda: all(self.status(i) is not None for i in (0, 1)), 30, "both workers serving")

    @property
    def run_dir(self) -> Path | None:
        found = re.search(r"run directory (\S+)\)", self.log.read_text())
        return Path(found.group(1)) if found else None

    def status(self, index: int) -> set[str] | None:
        """Node ids worker `index` holds (its private socket), or None if it does not answer."""
        try:
            return {c.node.id for c in fetch(f"unix:{self.run_dir}/worker-{index}.sock", timeout=2).config}
        except grpc.RpcError:
            return None

    def worker_of(self, node: str) -> int | None:
        return next((i for i in (0, 1) if node in (self.status(i) or ())), None)

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid, for the supervisor's children now."""
        pids = {}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if b"--worker" in argv:  # not a worker that exited and is not reaped yet
                        spec = argv[argv.index(b"--worker") + 1].decode()
                        pids[int(spec.split(":")[-3])] = int(pid)
        return pids


@pytest.fixture
def backends() -> Iterator[dict[str, TcpBackend]]:
    found = {name: TcpBackend(name=name) for name in PROXIES}
    try:
        yield found
    finally:
        for backend in found.values():
            backend.close()


@pytest.fixture
def served(tmp_path: Path, backends: dict[str, TcpBackend]) -> Iterator[tuple[Workers, dict[str, int]]]:
    """The server with two proxy entries, each with a TCP listener to its own backend."""
    envoy_path()
    ports = {name: free_port() for name in PROXIES}
    services = "".join(f"  svc-{n}: {{endpoints: ['127.0.0.1:{b.port}']}}\n" for n, b in backends.items())
    proxies = "".join(f"  {n}:\n    listeners:\n      - {{name: in, address: '127.0.0.1:{ports[n]}', protocol: tcp, "
                      f"service: svc-{n}}}\n" for n in PROXIES)
    topology = tmp_path / "topology.yaml"
    topology.write_text(f"apiVersion: keepsrc/v1\nservices:\n{services}proxies:\n{proxies}")
    workers = Workers(topology, tmp_path)
    try:
        yield workers, ports
    finally:
        workers.stop()


@contextlib.contextmanager
def envoys_on_both_workers(workers: Workers, workdir: Path) -> Iterator[dict[str, Envoy]]:
    """One Envoy per proxy entry, the second restarted until it reached the other worker."""
    started: dict[str, Envoy] = {}
    try:
        for name in PROXIES:
            for _ in range(MAX_PLACEMENT_TRIES):
                envoy = started[name] = envoy_for(workdir, workers.port, "ads-sotw", node=name).start()
                envoy.wait_ready()
                until(lambda name=name: workers.worker_of(name) is not None, 20, f"{name} on a worker")
                taken = {workers.worker_of(other) for other in started if other != name}
                if workers.worker_of(name) not in taken:
                    break
                envoy.stop()
            else:
                pytest.fail(f"{name} reached the same worker {MAX_PLACEMENT_TRIES} times")
        yield started
    finally:
        for envoy in started.values():
            envoy.stop()


def synced(target: str, nodes: tuple[str, ...]) -> bool:
    configs = {c.node.id: c for c in fetch(target).config}
    return all(n in configs and all(x.config_status == 1 for x in configs[n].generic_xds_configs)  # 1: SYNCED
               for n in nodes)


def test_status_and_metrics_show_the_envoys_of_every_worker(served: tuple[Workers, dict[str, int]],
                                                            tmp_path: Path) -> None:
    workers, ports = served
    with envoys_on_both_workers(workers, tmp_path):
        assert {workers.worker_of(n) for n in PROXIES} == {0, 1}
        for name, port in ports.items():
            assert tcp_backend(port).startswith(f"backend:{name}")
        # Each `keepsrc status` connects anew and may reach either worker: every one lists both.
        for _ in range(6):
            out = subprocess.run([sys.executable, "-m", "keepsrc", "status", "--xds", f"127.0.0.1:{workers.port}"],
                                 capture_output=True, text=True, cwd=ROOT, timeout=30)
            assert out.returncode == 0, out.stderr
            for name in PROXIES:
                assert re.search(rf"^{name} .*\n(  \S+ +\S+ +SYNCED +ACKED\n)+", out.stdout, re.MULTILINE), out.stdout
        until(lambda: 'keepsrc_xds_connected{api="sotw"} 2.0' in workers.metrics(), 10, "2 streams in /metrics")
        assert 'keepsrc_topology_reloads_total{result="ok"} 1.0' in workers.metrics()  # one load, not one a worker


def test_a_killed_worker_is_restarted_and_its_envoy_reconnects_without_churn(
        served: tuple[Workers, dict[str, int]], tmp_path: Path) -> None:
    workers, ports = served
    with envoys_on_both_workers(workers, tmp_path) as envoys:
        victim = PROXIES[0]
        index = workers.worker_of(victim)
        assert index is not None
        before = {name: {c: envoy.stat(c) for c in UPDATE_COUNTERS} for name, envoy in envoys.items()}
        pid = workers.worker_pids()[index]
        traffic = {name: Traffic(lambda port=port: tcp_backend(port),  # type: ignore[misc]
                                 lambda answer, name=name: answer.startswith(f"backend:{name}"))
                   for name, port in ports.items()}
        with contextlib.ExitStack() as stack:
            for t in traffic.values():
                stack.enter_context(t)
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            until(lambda: workers.worker_pids().get(index) not in (None, pid), 20, "the worker started again")
            until(lambda: workers.status(index) is not None, 30, "the new worker serving")
            until(lambda: envoys[victim].stat("control_plane.connected_state") == 1
                  and synced(f"127.0.0.1:{workers.port}", PROXIES), 30, "the Envoy back and SYNCED")
            time.sleep(1.0)  # traffic goes on after the reconnect too
        assert f"worker {index} (pid {pid}) ended with signal 9; starting it again" in workers.log.read_text()
        after = {name: {c: envoy.stat(c) for c in UPDATE_COUNTERS} for name, envoy in envoys.items()}
        assert after == before  # the reconnect carried what the Envoy held and nothing was sent
        for name, t in traffic.items():
            assert t.answers and not t.failures, (name, t.failures[:5])


def test_the_port_is_not_shared_with_another_server(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "keepsrc", "serve", "--listen", f"127.0.0.1:{port}",
                              "--workers", "2"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
