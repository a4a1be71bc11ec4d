"""Replicas benchmark: 2 `keepsrc serve --store etcd://...` processes on one etcd, N simulated
Envoys on each (tests/support/xds_client.py, SotW ADS, one fleet entry, 10 streams per connection).

It measures:
  (a) push to the last ACK on every stream of both replicas: from the etcd transaction of a push
      (what `keepsrc push` does after validating) to the last ACK of the new endpoints, p50/p99
      over --changes pushes;
  (b) the cost of a replica kill: SIGKILL one replica; each of its Envoys reconnects to the other
      after a fully jittered 0-250 ms backoff (Envoy's with `keepsrc bootstrap --xds A --xds B`)
      reporting what it holds. Time until the other replica's CSDS has every moved stream SYNCED,
      and the responses (and resources) it sent them: none is the goal, the handshake only;
  baseline, in the same run: (a) for one replica serving N streams from a file (the file written,
  to the last ACK).

    .venv/bin/python benchmarks/bench_replicas.py [--streams 1000] [--changes 5] [--delta]

Needs etcd (scripts/install-system-packages). Not a test: it prints numbers and checks nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_ads import expected_endpoint_version, percentile, topology  # noqa: E402
from keepsrc.server.status import fetch_replica  # noqa: E402
from keepsrc.snapshots.snapshot import ENDPOINT  # noqa: E402
from keepsrc.store import open_etcd  # noqa: E402
from tests.support.envoy import free_port  # noqa: E402
from tests.support.etcd_lab import EtcdCluster, Replica, push  # noqa: E402
from tests.support.xds_client import XdsClient  # noqa: E402

PER_CONNECTION = 10
RETRY_BASE_S = 0.25  # keepsrc bootstrap's retry_back_off base for replicas; Envoy jitters it fully


class Fleet:
    """Simulated Envoys: each follows its replica and, when the stream breaks, reconnects to the
    next target after a jittered backoff, carrying over what it holds (as Envoy does)."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.expected = ""
        self.acked = 0
        self.last_ack = 0.0
        self.all_acked = asyncio.Event()
        self.total = 0
        self.moved_responses = 0
        self.moved_resources = 0
        self.moved_nodes: set[str] = set()
        self._channels: dict[str, list[grpc.aio.Channel]] = {}
        self._counts: dict[str, int] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def channel(self, target: str) -> grpc.aio.Channel:
        count = self._counts.get(target, 0)
        if count % PER_CONNECTION == 0:
            self._channels.setdefault(target, []).append(grpc.aio.insecure_channel(target))
        self._counts[target] = count + 1
        return self._channels[target][-1]

    def expect(self, version: str) -> None:
        self.expected, self.acked = version, 0
        self.all_acked.clear()

    def _on_ack(self, client: XdsClient, type_url: str) -> None:
        if type_url == ENDPOINT and client.versions.get(ENDPOINT) == self.expected:
            self.acked += 1
            self.last_ack = time.monotonic()
            if self.acked == self.total:
                self.all_acked.set()

    def _on_moved_response(self, client: XdsClient, type_url: str, incoming: dict[str, object],
                           removed: tuple[str, ...], error: str | None) -> None:
        self.moved_responses += 1
        self.moved_resources += len(incoming) + len(removed)

    def start(self, name: str, targets: list[str]) -> None:
        self.total += 1
        self.tasks.append(asyncio.create_task(self._envoy(name, targets)))

    async def _envoy(self, name: str, targets: list[str]) -> None:
        previous: XdsClient | None = None
        for attempt in range(50):
            target = targets[attempt % len(targets)]
            moved = previous is not None
            client = XdsClient(self.channel(target), name, "edge", delta=self.delta, on_ack=self._on_ack,
                               keep_history=False, on_response=self._on_moved_response if moved else None)
            if previous is not None:
                client.carry_over(previous)
                self.moved_nodes.add(name)
            try:
                await client.run()
                return
            except grpc.aio.AioRpcError:
                previous = client if client.versions else previous
                await asyncio.sleep(random.uniform(0, RETRY_BASE_S))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channels in self._channels.values():
            for channel in channels:
                await channel.close()


async def pushes(fleet: Fleet, changes: int, write: Callable[[str], object]) -> list[float]:
    """Seconds from each change to the last ACK of its endpoints on every stream."""
    times = []
    for k in range(changes):
        text = topology(9000 + k)
        fleet.expect(expected_endpoint_version(text))
        started = time.monotonic()
        result = write(text)
        if asyncio.iscoroutine(result):
            await result
        await asyncio.wait_for(fleet.all_acked.wait(), 120)
        times.append(fleet.last_ack - started)
        await asyncio.sleep(0.3)
    return times


def synced_nodes(target: str) -> int:
    response = fetch_replica(target, timeout=10).response
    return sum(1 for config in response.config
               if config.generic_xds_configs and all(x.config_status == 1 for x in config.generic_xds_configs))


async def file_baseline(n: int, changes: int, delta: bool, workdir: Path) -> list[float]:
    path = workdir / "baseline.yaml"
    path.write_text(topology(8080))
    port = free_port()
    log = (workdir / "baseline.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "keepsrc.server", str(path), "--listen", f"127.0.0.1:{port}",
                               "--log-level", "warning"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    fleet = Fleet(delta)
    try:
        fleet.expect(expected_endpoint_version(path.read_text()))
        for i in range(n):
            fleet.start(f"edge-{i}", [f"127.0.0.1:{port}"])
        await asyncio.wait_for(fleet.all_acked.wait(), 300)
        return await pushes(fleet, changes, path.write_text)
    finally:
        await fleet.close()
        server.terminate()
        server.wait(15)
        log.close()


async def replicas(n: int, changes: int, delta: bool, workdir: Path) -> dict[str, float]:
    etcd = EtcdCluster(workdir).start()
    first = workdir / "topology.yaml"
    first.write_text(topology(8080))
    push(first, etcd)
    quiet = ["--log-level", "warning"]
    a, b = Replica(workdir, "a", etcd.url(), quiet).start(), Replica(workdir, "b", etcd.url(), quiet).start()
    store = open_etcd(etcd.url())
    fleet = Fleet(delta)
    try:
        await asyncio.to_thread(a.wait_serving)
        await asyncio.to_thread(b.wait_serving)
        fleet.expect(expected_endpoint_version(first.read_text()))
        for i in range(2 * n):
            # Half the fleet lists a first, half b first: n streams on each replica.
            targets = [a.target, b.target] if i < n else [b.target, a.target]
            fleet.start(f"edge-{i}", targets)
        await asyncio.wait_for(fleet.all_acked.wait(), 300)

        async def write(text: str) -> None:
            await store.write(text.encode(), await store.latest_revision())

        times = await pushes(fleet, changes, write)
        before = synced_nodes(b.target)
        started = time.monotonic()
        a.kill()
        async with asyncio.timeout(120):
            # CSDS from a thread: the simulated Envoys run on this loop.
            while await asyncio.to_thread(synced_nodes, b.target) != 2 * n:
                await asyncio.sleep(0.02)
        failover = time.monotonic() - started
        await asyncio.sleep(1.0)  # anything b would (wrongly) send after the handshake
        return {
            "median_ms": statistics.median(times) * 1000, "p99_ms": percentile(times, 0.99) * 1000,
            "failover_s": failover, "moved": len(fleet.moved_nodes), "on_b_before": before,
            "responses": fleet.moved_responses, "resources": fleet.moved_resources,
        }
    finally:
        await fleet.close()
        await store.close()
        for replica in (a, b):
            replica.stop()
        etcd.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000, help="simulated Envoys per replica (default 1000)")
    parser.add_argument("--changes", type=int, default=5, help="pushes measured (default 5)")
    parser.add_argument("--delta", action="store_true", help="delta ADS instead of state of the world")
    args = parser.parse_args()
    n = args.streams
    print(f"{'delta' if args.delta else 'SotW'} ADS, one fleet entry, {PER_CONNECTION} streams per connection, "
          f"{args.changes} pushes, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        base = await file_baseline(n, args.changes, args.delta, Path(tmp))
        print(f"baseline: 1 replica from a file, {n} streams: file written -> last ACK "
              f"p50 {statistics.median(base) * 1000:.0f} ms, p99 {percentile(base, 0.99) * 1000:.0f} ms", flush=True)
        r = await replicas(n, args.changes, args.delta, Path(tmp))
    print(f"2 replicas on etcd, {2 * n} streams: etcd write -> last ACK on every stream "
          f"p50 {r['median_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms")
    print(f"replica killed: {r['moved']:.0f} streams moved to the other (which had {r['on_b_before']:.0f}); "
          f"all SYNCED there {r['failover_s']:.2f} s after the kill; responses sent to them: "
          f"{r['responses']:.0f} ({r['resources']:.0f} resources)")


if __name__ == "__main__":
    asyncio.run(main())
