"""ADS benchmark: simulated Envoys against `keepsrc serve --workers N`, and against the floor of
the stack (benchmarks/ads_baseline_server.py: bare grpc.aio pushing the same bytes) in the same run.

Simulated Envoys run in --sim-procs processes of their own (default: one per core), each stream
subscribing as Envoy does (wildcard CDS and LDS, then EDS for the clusters and RDS for the route
configs they name) and ACKing every response. They share one proxy entry as a fleet does (same
node.cluster, distinct node ids), or with --distinct one entry each. Per stream count and server:

  connect s    every stream opened at once from nothing, until all hold the config (all ACKed);
  median/p99   from a topology file edit that moves an endpoint to the last stream's ACK of it,
               over --changes edits (the server reads the file with the same watcher in both);
  KB/stream    server RSS (every process of it) with all streams idle, minus before any stream;
  CPU s/push   server CPU (user+system, every process) over one edit;
  restart s    SIGTERM the server, edit the file, start it again: from the new process to the
               last stream reconnected (carrying what it holds, after a 0-250 ms jitter) and
               ACKing the new endpoints.

Targets (2-core machine): 10,000 streams p99 < 1.5 s, 1,000 < 150 ms, restart < 4 s, < 20 KB/stream.

    .venv/bin/python benchmarks/bench_ads.py [--streams 1000,5000,10000] [--workers 1,2] [--changes 5]
        [--delta] [--distinct] [--no-floor] [--repeat 2]

Not a test: it prints numbers and checks nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import Node
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
)
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keepsrc.snapshots.builder import build_snapshots  # noqa: E402
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE  # noqa: E402
from keepsrc.topology import check_topology_text  # noqa: E402
from tests.support.envoy import free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
# An Envoy's reconnect: fully jittered backoff from 250 ms (keepsrc bootstrap's base), at most 1 s here.
RETRY_BASE_S, RETRY_MAX_S = 0.25, 1.0
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]


def topology(port: int, proxies: int = 0) -> str:
    """A realistic small proxy: a TCP and an HTTP listener over three services. With `proxies`,
    that many distinct entries edge-0 ... (each its own listeners), instead of one fleet entry."""
    names = [f"edge-{i}" for i in range(proxies)] if proxies else ["edge"]
    entries = "".join(f"""  {name}:
    listeners:
      - {{name: db-in, address: "0.0.0.0:{15432 + i % 1000}", protocol: tcp, service: db}}
      - name: http-in
        address: 0.0.0.0:{8000 + i % 1000}
        protocol: http
        routes: [{{prefix: /api, service: api}}, {{prefix: /, service: web}}]
""" for i, name in enumerate(names))
    return f"""apiVersion: keepsrc/v1
services:
  web: {{endpoints: ["10.0.0.1:{port}", "10.0.0.2:8080"]}}
  api: {{endpoints: ["10.0.1.1:8080", "10.0.1.2:8080"]}}
  db: {{endpoints: ["10.0.2.1:5432"]}}
proxies:
{entries}"""


def expected_endpoint_version(text: str) -> str:
    topo, diagnostics = check_topology_text(text)
    assert topo is not None, diagnostics
    # Every proxy entry uses the same three services, so they share one EDS version.
    return next(iter(build_snapshots(topo).values())).version(ENDPOINT)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- simulated Envoys (in --sim processes) ----------------------------------------------------------
_followed: dict[tuple[str, str], frozenset[str]] = {}  # (type, version) -> the EDS/RDS names it names


def _follows(type_url: str, version: str, resources: list[bytes]) -> frozenset[str]:
    """EDS clusters named by a CDS response, or route configs by an LDS one; parsed once per
    version per process, as every stream of a fleet gets the same ones."""
    names = _followed.get((type_url, version))
    if names is None:
        found = set()
        for body in resources:
            if type_url == CLUSTER:
                cluster = Cluster.FromString(body)
                if cluster.type == Cluster.EDS:
                    found.add(cluster.name)
            else:
                for chain in Listener.FromString(body).filter_chains:
                    for f in chain.filters:
                        if f.typed_config.Is(HttpConnectionManager.DESCRIPTOR):
                            hcm = HttpConnectionManager.FromString(f.typed_config.value)
                            if hcm.HasField("rds"):
                                found.add(hcm.rds.route_config_name)
        names = _followed[(type_url, version)] = frozenset(found)
    return names


class Sim:
    """The streams of one simulator process, and what it reports to the benchmark."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.expected = ""
        self.acked = 0
        self.count = 0
        self.last = 0.0
        self.reconnects = 0

    def expect(self, version: str) -> None:
        self.expected, self.acked = version, 0

    def eds_acked(self, version: str) -> None:
        if version == self.expected:
            self.acked += 1
            self.last = time.monotonic()
            if self.acked == self.count:
                print(f"done {self.last} {self.reconnects}", flush=True)


class SimEnvoy:
    """One ADS stream that subscribes and ACKs like Envoy; on a broken stream it reconnects,
    reporting what it holds (SotW version_info, delta initial_resource_versions)."""

    __slots__ = ("channel", "held", "names", "node", "sim", "versions")

    def __init__(self, sim: Sim, channel: grpc.aio.Channel, node_id: str, cluster: str) -> None:
        self.sim = sim
        self.channel = channel
        self.node = Node(id=node_id, cluster=cluster)
        self.versions: dict[str, str] = {}  # SotW: type -> version held
        self.held: dict[str, dict[str, str]] = {}  # delta: type -> name -> version held
        self.names: dict[str, frozenset[str]] = {}  # EDS/RDS: what is subscribed

    async def keep_running(self) -> None:
        attempt = 0
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.run()
            self.sim.reconnects += 1
            attempt += 1
            await asyncio.sleep(random.random() * min(RETRY_MAX_S, RETRY_BASE_S * 2 ** min(attempt, 4)))

    def _request(self, type_url: str, nonce: str = "", first: bool = False) -> bytes:
        node = self.node if first else None
        if self.sim.delta:
            names = self.names.get(type_url)
            request = DeltaDiscoveryRequest(node=node, type_url=type_url, response_nonce=nonce)
            if not nonce:
                if names:
                    request.resource_names_subscribe.extend(sorted(names))
                request.initial_resource_versions.update(self.held.get(type_url, {}))
            return request.SerializeToString()
        return DiscoveryRequest(node=node, type_url=type_url, response_nonce=nonce,
                                version_info=self.versions.get(type_url, ""),
                                resource_names=sorted(self.names.get(type_url, ()))).SerializeToString()

    async def run(self) -> None:
        delta = self.sim.delta
        call = self.channel.stream_stream(
            ADS + ("DeltaAggregatedResources" if delta else "StreamAggregatedResources"),
            request_serializer=bytes,
            response_deserializer=(DeltaDiscoveryResponse if delta else DiscoveryResponse).FromString)()
        try:
            await call.write(self._request(CLUSTER, first=True))
            await call.write(self._request(LISTENER))
            for type_url in (ENDPOINT, ROUTE):
                if self.names.get(type_url):
                    await call.write(self._request(type_url))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                await self._handle(call, response)
        finally:
            call.cancel()

    async def _handle(self, call: grpc.aio.StreamStreamCall,
                      response: DiscoveryResponse | DeltaDiscoveryResponse) -> None:
        type_url = response.type_url
        if self.sim.delta:
            held = self.held.setdefault(type_url, {})
            for resource in response.resources:
                held[resource.name] = resource.version
            for name in response.removed_resources:
                held.pop(name, None)
            version = response.system_version_info
            bodies = [r.resource.value for r in response.resources]
            await call.write(self._request(type_url, response.nonce))
        else:
            version = self.versions[type_url] = response.version_info
            bodies = [a.value for a in response.resources]
            await call.write(self._request(type_url, response.nonce))
        if type_url == ENDPOINT:
            self.sim.eds_acked(version)
        elif type_url in (CLUSTER, LISTENER) and (bodies or not self.sim.delta):
            follow = ENDPOINT if type_url == CLUSTER else ROUTE
            wanted = _follows(type_url, version, bodies)
            if self.sim.delta:
                wanted = wanted | self.names.get(follow, frozenset())
            if wanted != self.names.get(follow):
                before = self.names.get(follow, frozenset())
                self.names[follow] = wanted
                if self.sim.delta:
                    request = DeltaDiscoveryRequest(type_url=follow, resource_names_subscribe=sorted(wanted - before))
                    await call.write(request.SerializeToString())
                else:
                    await call.write(self._request(follow, nonce=""))


async def sim_main(target: str, first: int, count: int, per_connection: int, delta: bool, distinct: bool,
                   expected: str) -> None:
    """A simulator process: `count` streams; reads `go` and `expect VERSION` on stdin, writes
    `done T RECONNECTS` once every stream ACKed the expected EDS version."""
    sim = Sim(delta)
    sim.count = count
    sim.expect(expected)
    channels: list[grpc.aio.Channel] = []
    envoys = []
    for i in range(first, first + count):
        if (i - first) % per_connection == 0:
            channels.append(grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS))
        envoys.append(SimEnvoy(sim, channels[-1], f"edge-{i}", "" if distinct else "edge"))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("armed", flush=True)
    tasks = []
    while line := (await reader.readline()).decode().split():
        if line[0] == "go":
            tasks = [asyncio.create_task(envoy.keep_running()) for envoy in envoys]
        elif line[0] == "expect":
            sim.expect(line[1])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- the benchmark ----------------------------------------------------------------------------------
class Sims:
    """The simulator processes, driven over their stdin/stdout."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, target: str, n: int, procs: int, per_connection: int, delta: bool, distinct: bool,
                    expected: str) -> float:
        """Start every stream at once; returns when all are configured: seconds since `go`."""
        share = -(-n // procs)
        for first in range(0, n, share):
            self.procs.append(await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--sim", target, str(first), str(min(share, n - first)),
                str(per_connection), str(int(delta)), str(int(distinct)), expected,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE))
        for proc in self.procs:
            assert proc.stdout is not None
            assert (await proc.stdout.readline()).strip() == b"armed"
        started = time.monotonic()
        self._send("go")
        return await self.done() - started

    def _send(self, line: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line.encode() + b"\n")

    def expect(self, version: str) -> None:
        self._send(f"expect {version}")

    async def done(self, timeout: float = 300) -> float:
        """The time of the last ACK of the expected version, over every simulator."""
        lasts = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).split()
            if not line:
                raise RuntimeError("a simulator exited")
            lasts.append(float(line[1]))
        return max(lasts)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                assert proc.stdin is not None
                proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor and its workers)."""
    pids = [pid]
    for p in pids:
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                pids.extend(int(c) for c in (task / "children").read_text().split())
    return pids


def rss_kb(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICKS


@dataclass
class Config:
    server: str  # "keepsrc" or "floor"
    workers: int
    n: int


def server_command(config: Config, path: Path, port: int) -> list[str]:
    if config.server == "floor":
        return [sys.executable, str(ROOT / "benchmarks/ads_baseline_server.py"), f"127.0.0.1:{port}", str(path),
                "--workers", str(config.workers)]
    return [sys.executable, "-m", "keepsrc.server", str(path), "--listen", f"127.0.0.1:{port}",
            "--log-level", "warning", "--workers", str(config.workers)]


async def wait_serving(target: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 30
    while True:
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no server at {target}")
        await asyncio.sleep(0.1)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def run_config(config: Config, changes: int, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    proxies = config.n if args.distinct else 0
    path = workdir / f"topology-{config.server}-{config.workers}-{config.n}.yaml"
    path.write_text(topology(8080, proxies))
    port = free_port()
    target = f"127.0.0.1:{port}"
    log = (workdir / f"server-{config.server}-{config.workers}-{config.n}.log").open("ab")
    server = subprocess.Popen(server_command(config, path, port), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    sims = Sims()
    try:
        await wait_serving(target)
        await asyncio.sleep(1.0)  # every worker up and idle
        rss_before = rss_kb(server.pid)
        connect_s = await sims.start(target, config.n, args.sim_procs, args.streams_per_connection, args.delta,
                                     args.distinct, expected_endpoint_version(path.read_text()))
        await asyncio.sleep(2.0)  # let the server settle (and collect) before measuring idle RSS
        rss_idle = rss_kb(server.pid)

        converge, cpu = [], []
        for k in range(changes):
            text = topology(9000 + k, proxies)
            sims.expect(expected_endpoint_version(text))
            cpu_before = cpu_seconds(server.pid)
            t0 = time.monotonic()
            path.write_text(text)
            converge.append(await sims.done() - t0)
            await asyncio.sleep(0.3)  # the server's share of the push is over once all ACKs are in
            cpu.append(cpu_seconds(server.pid) - cpu_before)
            await asyncio.sleep(0.2)

        # A control-plane restart with a change: every stream reconnects holding its config.
        text = topology(7000, proxies)
        sims.expect(expected_endpoint_version(text))
        stop_server(server)
        path.write_text(text)
        t0 = time.monotonic()
        server = subprocess.Popen(server_command(config, path, port), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        restart_s = await sims.done() - t0
        return {
            "connect_s": connect_s,
            "median_ms": statistics.median(converge) * 1000,
            "p99_ms": percentile(converge, 0.99) * 1000,
            "rss_per_stream_kb": (rss_idle - rss_before) / config.n,
            "rss_idle_mb": rss_idle / 1024,
            "cpu_per_push_s": statistics.median(cpu),
            "restart_s": restart_s,
        }
    finally:
        await sims.stop()
        stop_server(server)
        log.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1000,5000,10000", help="comma-separated stream counts")
    parser.add_argument("--workers", default=f"1,{os.cpu_count()}", help="comma-separated worker counts")
    parser.add_argument("--changes", type=int, default=5, help="topology edits per configuration (default 5)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every configuration (default 1)")
    parser.add_argument("--delta", action="store_true", help="delta ADS instead of state of the world")
    parser.add_argument("--distinct", action="store_true",
                        help="one proxy entry per stream (node ids edge-0 ...), not one fleet entry")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare grpc.aio floor")
    parser.add_argument("--sim-procs", type=int, default=os.cpu_count(), help="simulator processes")
    parser.add_argument("--streams-per-connection", type=int, default=10,
                        help="ADS streams multiplexed on one HTTP/2 connection (default 10)")
    args = parser.parse_args()
    servers = ["keepsrc"] if args.no_floor or args.delta or args.distinct else ["floor", "keepsrc"]
    print(f"{'delta' if args.delta else 'SotW'} ADS, {'distinct entries' if args.distinct else 'one fleet entry'}, "
          f"{args.streams_per_connection} streams per connection, {args.sim_procs} simulator processes, "
          f"{args.changes} changes per run, {os.cpu_count()} CPUs")
    print(f"{'server':>8} {'workers':>7} {'streams':>8} {'connect s':>10} {'median ms':>10} {'p99 ms':>8} "
          f"{'x floor':>8} {'KB/stream':>10} {'idle RSS MB':>12} {'CPU s/push':>11} {'restart s':>10}")
    floors: dict[tuple[int, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.streams.split(",")):
            for workers in (int(w) for w in args.workers.split(",")):
                for server in servers:
                    for _ in range(args.repeat):
                        r = await run_config(Config(server, workers, n), args.changes, args, Path(tmp))
                        if server == "floor":
                            floors.setdefault((workers, n), []).append(r["p99_ms"])
                        floor = floors.get((workers, n))
                        ratio = f"{r['p99_ms'] / statistics.median(floor):.2f}" if floor else "-"
                        print(f"{server:>8} {workers:>7} {n:>8} {r['connect_s']:>10.2f} {r['median_ms']:>10.0f} "
                              f"{r['p99_ms']:>8.0f} {ratio:>8} {r['rss_per_stream_kb']:>10.1f} "
                              f"{r['rss_idle_mb']:>12.1f} {r['cpu_per_push_s']:>11.3f} {r['restart_s']:>10.2f}",
                              flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sim"]:
        target, first, count, per_connection, delta, distinct, expected = sys.argv[2:9]
        asyncio.run(sim_main(target, int(first), int(count), int(per_connection), delta == "1", distinct == "1",
                             expected))
    else:
        asyncio.run(main())
