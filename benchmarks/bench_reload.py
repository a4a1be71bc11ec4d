"""Hot reload of a big topology file: how long a load takes, and how long the event loop (which
serves every xDS stream) stalls meanwhile.

    .venv/bin/python benchmarks/bench_reload.py [--services 5000] [--repeat 3]

Baseline, measured in the same run: the load on the event loop, as reloads ran before they moved
to a worker thread (`TopologySource.load()` called from the loop). Each reload moves every
endpoint to another port, so every reload builds and swaps in new snapshots.

Measured on the 2-core CI machine (1.5 MB file): before, a reload stalled the loop for its whole
load, 1.4 s (1.2-1.6 s); in a worker thread alone the stall was still 300 ms, the cyclic garbage
collector walking the heap four times per load with the GIL held; with it paused during the load,
the stall is 22-40 ms (the GIL's switching) and the load itself 0.86-0.90 s instead of 1.4 s.
Since then loads got faster (0.54 s; the stall 24 ms, worst 27 ms; on the loop: 513 ms), and with
the plain pass faster again (277 ms; the stall 13 ms, worst 17 ms; on the loop: 265 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_build import generate, to_yaml

from keepsrc.server import SnapshotCache, TopologySource

HEARTBEAT_S = 0.001


async def max_stall(reload: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(seconds the reload took, longest gap between ticks of a 1 ms heartbeat on the same loop)."""
    ticks: list[float] = []

    async def heartbeat() -> None:
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(HEARTBEAT_S)

    beating = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await reload()
    took = time.perf_counter() - started
    await asyncio.sleep(0.05)
    beating.cancel()
    during = [t for t in ticks if t >= started]
    return took, max(b - a for a, b in zip([started, *during], during, strict=False))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "topology.yaml"
        text = to_yaml(generate(args.services, 10, 50))
        path.write_text(text)
        print(f"{args.services} services x 10 endpoints, 50 proxies: {path.stat().st_size / 1e6:.1f} MB of YAML")
        source = TopologySource(SnapshotCache(), path)
        started = time.perf_counter()
        assert source.load()
        print(f"first load (read, validate, build, swap): {time.perf_counter() - started:.2f} s")

        async def on_the_loop() -> None:
            assert source.load()

        results: dict[str, list[tuple[float, float]]] = {"on the event loop (before)": [],
                                                         "in a worker thread (after)": []}
        ports = itertools.count(8081)
        for _ in range(args.repeat):
            for name, reload in (("on the event loop (before)", on_the_loop),
                                 ("in a worker thread (after)", source.reload)):
                path.write_text(text.replace(":8080", f":{next(ports)}"))
                results[name].append(await max_stall(reload))
        print(f"{'reload':30} {'load time (median)':>20} {'max loop stall (median)':>25} {'(worst)':>10}")
        for name, runs in results.items():
            loads, stalls = zip(*runs, strict=True)
            print(f"{name:30} {statistics.median(loads) * 1000:>17.0f} ms "
                  f"{statistics.median(stalls) * 1000:>22.1f} ms {max(stalls) * 1000:>7.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
