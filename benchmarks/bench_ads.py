"""ADS benchmark: simulated Envoys (this process) against a `keepsrc serve` process.

For 100, 1,000 and 5,000 ADS streams that subscribe and ACK like Envoy (tests/support/xds_client.py),
sharing one proxy entry as a fleet does (same node.cluster, distinct node ids), or with
--distinct one proxy entry each (1,000 node ids, each its own listeners), it measures:
  (a) time from a topology file change to the last ACK of the new version, median and p99 over
      --changes edits (each moves an endpoint, so EDS changes and nothing else);
  (b) server RSS per connected stream (RSS with all streams idle minus RSS before any stream);
  (c) server CPU seconds per push (user+system of the server process over one change);
  baseline, in the same run: RSS per idle stream of a bare grpc.aio server (ads_baseline_server.py).
Targets on a 2-core machine: 1,000 streams converge < 300 ms; 5,000 < 2 s; < 20 KB RSS per idle stream.

    .venv/bin/python benchmarks/bench_ads.py [--streams 100,1000,5000] [--changes 5] [--delta] [--distinct]

Not a test: it prints numbers and checks nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keepsrc.snapshots.builder import build_snapshots  # noqa: E402
from keepsrc.snapshots.snapshot import ENDPOINT  # noqa: E402
from keepsrc.topology import check_topology_text  # noqa: E402
from tests.support.envoy import free_port  # noqa: E402
from tests.support.xds_client import XdsClient  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


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


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def keep_running(client: XdsClient, state: dict[str, Any]) -> None:
    """Reconnect a failed stream after a jittered backoff, as Envoy does."""
    for _ in range(20):
        try:
            await client.run()
            return
        except grpc.aio.AioRpcError:
            state["reconnects"] += 1
            await asyncio.sleep(0.2 + random.random())


async def run_size(n: int, changes: int, delta: bool, per_connection: int, workdir: Path,
                   distinct: bool = False) -> dict[str, float]:
    proxies = n if distinct else 0
    path = workdir / f"topology-{n}.yaml"
    path.write_text(topology(8080, proxies))
    port = free_port()
    log = (workdir / f"server-{n}.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "keepsrc.server", str(path), "--listen", f"127.0.0.1:{port}", "--log-level", "warning"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        target = f"127.0.0.1:{port}"
        probe = grpc.aio.insecure_channel(target)
        await asyncio.wait_for(probe.channel_ready(), 20)
        await probe.close()
        await asyncio.sleep(0.5)
        rss_before = rss_kb(server.pid)

        state = {"expected": expected_endpoint_version(path.read_text()), "done": 0, "last": 0.0, "reconnects": 0}
        all_done = asyncio.Event()

        def on_ack(client: XdsClient, type_url: str) -> None:
            if type_url == ENDPOINT and client.versions.get(ENDPOINT) == state["expected"]:
                state["done"] += 1
                state["last"] = time.monotonic()
                if state["done"] == n:
                    all_done.set()

        clients = []
        for i in range(n):
            if i % per_connection == 0:
                channels.append(grpc.aio.insecure_channel(target))
            clients.append(XdsClient(channels[-1], f"edge-{i}", "" if distinct else "edge", delta=delta, on_ack=on_ack,
                                     keep_history=False))
        started = time.monotonic()
        # All at once, like a fleet reconnecting to a restarted server.
        tasks = [asyncio.create_task(keep_running(client, state)) for client in clients]
        await asyncio.wait_for(all_done.wait(), 300)
        connect_s = time.monotonic() - started
        await asyncio.sleep(1.0)  # let the server settle (and collect) before measuring idle RSS
        rss_idle = rss_kb(server.pid)

        converge, cpu = [], []
        for k in range(changes):
            text = topology(9000 + k, proxies)
            state.update(expected=expected_endpoint_version(text), done=0)
            all_done.clear()
            cpu_before = cpu_seconds(server.pid)
            t0 = time.monotonic()
            path.write_text(text)
            await asyncio.wait_for(all_done.wait(), 120)
            converge.append(state["last"] - t0)
            await asyncio.sleep(0.3)  # the server's share of the push is over once all ACKs are in
            cpu.append(cpu_seconds(server.pid) - cpu_before)
            await asyncio.sleep(0.2)
        return {
            "connect_s": connect_s,
            "median_ms": statistics.median(converge) * 1000,
            "p99_ms": percentile(converge, 0.99) * 1000,
            "rss_per_stream_kb": (rss_idle - rss_before) / n,
            "rss_idle_mb": rss_idle / 1024,
            "cpu_per_push_s": statistics.median(cpu),
            "reconnects": state["reconnects"],
        }
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


async def baseline_rss_per_stream(n: int, per_connection: int, workdir: Path) -> float:
    """KB per idle stream on a bare grpc.aio server (ads_baseline_server.py): grpc's own share."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "benchmarks/ads_baseline_server.py"), f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    channels: list[grpc.aio.Channel] = []
    calls: list[Any] = []
    try:
        target = f"127.0.0.1:{port}"
        probe = grpc.aio.insecure_channel(target)
        await asyncio.wait_for(probe.channel_ready(), 20)
        await probe.close()
        await asyncio.sleep(0.5)
        rss_before = rss_kb(server.pid)
        request = DiscoveryRequest(type_url=ENDPOINT).SerializeToString()
        for i in range(n):
            if i % per_connection == 0:
                channels.append(grpc.aio.insecure_channel(target))
            call = channels[-1].stream_stream("/envoy.service.discovery.v3.AggregatedDiscoveryService/"
                                              "StreamAggregatedResources",
                                              request_serializer=bytes, response_deserializer=bytes)()
            await call.write(request)
            calls.append(call)
        await asyncio.sleep(1.5)  # every stream open and idle
        return (rss_kb(server.pid) - rss_before) / n
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()
        server.kill()
        server.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="100,1000,5000", help="comma-separated stream counts")
    parser.add_argument("--changes", type=int, default=5, help="topology edits per size (default 5)")
    parser.add_argument("--delta", action="store_true", help="delta ADS instead of state of the world")
    parser.add_argument("--distinct", action="store_true",
                        help="one proxy entry per stream (node ids edge-0 ...), not one fleet entry")
    parser.add_argument("--streams-per-connection", type=int, default=10,
                        help="ADS streams multiplexed on one HTTP/2 connection (default 10)")
    args = parser.parse_args()
    print(f"{'delta' if args.delta else 'SotW'} ADS, {'distinct entries' if args.distinct else 'one fleet entry'}, "
          f"{args.streams_per_connection} streams per connection, "
          f"{args.changes} changes per size, {os.cpu_count()} CPUs")
    print(f"{'streams':>8} {'connect s':>10} {'median ms':>10} {'p99 ms':>8} {'KB/stream':>10} "
          f"{'bare grpc KB':>13} {'idle RSS MB':>12} {'CPU s/push':>11} {'reconnects':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.streams.split(",")):
            r = await run_size(n, args.changes, args.delta, args.streams_per_connection, Path(tmp), args.distinct)
            bare = await baseline_rss_per_stream(n, args.streams_per_connection, Path(tmp))
            print(f"{n:>8} {r['connect_s']:>10.2f} {r['median_ms']:>10.0f} {r['p99_ms']:>8.0f} "
                  f"{r['rss_per_stream_kb']:>10.1f} {bare:>13.1f} {r['rss_idle_mb']:>12.1f} "
                  f"{r['cpu_per_push_s']:>11.3f} "
                  f"{r['reconnects']:>11}",
                  flush=True)


if __name__ == "__main__":
    asyncio.run(main())
