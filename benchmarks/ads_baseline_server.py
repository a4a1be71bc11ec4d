"""The floor for bench_ads.py: a bare grpc.aio ADS server pushing the same bytes as keepsrc.

It reads and watches the topology as keepsrc does (keepsrc's TopologySource, so an edit reaches
both after the same file watcher) and takes each type's response from keepsrc's encoding; per
stream it only answers each new subscription with the whole type and ignores ACKs, and on a change
writes the new endpoints to every stream, one task per write. No ACK/NACK bookkeeping, no
ordering, no status: what is left is what grpc.aio itself costs per stream and per message.
With --workers N, N such processes share the port (SO_REUSEPORT), as `keepsrc serve --workers N`;
each runs with `keepsrc serve`'s cycle-collector thresholds, so that keepsrc / floor compares the
xDS logic, not the runtime's settings.

    python benchmarks/ads_baseline_server.py 127.0.0.1:PORT TOPOLOGY.yaml [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from grpc_health.v1 import health, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keepsrc.server import wire
from keepsrc.server.cache import SnapshotCache
from keepsrc.server.cli import SERVING_GC_THRESHOLDS
from keepsrc.server.reload import TopologySource
from keepsrc.snapshots.snapshot import ENDPOINT, TYPE_ORDER

SERVER_OPTIONS = [("grpc.server.max_pending_requests", 100_000),
                  ("grpc.server.max_pending_requests_hard_limit", 100_000),
                  ("grpc.keepalive_time_ms", 60_000),
                  ("grpc.http2.min_ping_interval_without_data_ms", 10_000)]
KEY = "edge"  # the fleet's proxy entry in bench_ads.py's topology


class Floor:
    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self.responses: dict[str, bytes] = {}
        self.eds_streams: set[grpc.aio.ServicerContext] = set()
        self.nonces = itertools.count(1)
        self.tasks: set[asyncio.Task[None]] = set()
        self._encode()

    def _encode(self) -> None:
        entry = self.cache.resolve(KEY, KEY)
        assert entry is not None
        for type_url in TYPE_ORDER:
            resources = entry.of_type(type_url, "")
            self.responses[type_url] = entry.sotw_response(type_url, ("all", type_url, ""),
                                                           lambda r=resources: list(r.values()))[1]

    def nonce(self) -> bytes:
        return wire.text(wire.SOTW_NONCE, str(next(self.nonces)))

    def snapshot_changed(self) -> None:
        self._encode()
        body = self.responses[ENDPOINT]
        loop = asyncio.get_running_loop()
        for context in self.eds_streams:
            task = loop.create_task(context.write(body + self.nonce()))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def stream(self, _requests: object, context: grpc.aio.ServicerContext) -> None:
        names: dict[str, list[str]] = {}
        try:
            while (request := await context.read()) is not grpc.aio.EOF:
                type_url = request.type_url
                if request.response_nonce and request.resource_names == names.get(type_url):
                    continue  # an ACK
                names[type_url] = list(request.resource_names)
                await context.write(self.responses[type_url] + self.nonce())
                if type_url == ENDPOINT:
                    self.eds_streams.add(context)
        finally:
            self.eds_streams.discard(context)


async def serve(address: str, path: Path, reuseport: bool) -> None:
    cache = SnapshotCache()
    source = TopologySource(cache, path)
    assert source.load()
    cache.bind(asyncio.get_running_loop())
    floor = Floor(cache)
    cache.watch(floor, (KEY,))
    server = grpc.aio.server(options=[*SERVER_OPTIONS, ("grpc.so_reuseport", int(reuseport))])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {"StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            floor.stream, request_deserializer=DiscoveryRequest.FromString, response_serializer=bytes)},
    )])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    watcher = asyncio.create_task(source.watch(stop, debounce_ms=200))
    await stop.wait()
    await server.stop(1.0)
    await watcher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("topology", type=Path)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers == 1 or args.worker:
        gc.set_threshold(*SERVING_GC_THRESHOLDS)
        asyncio.run(serve(args.address, args.topology, reuseport=args.worker))
        return
    workers = [subprocess.Popen([sys.executable, __file__, args.address, str(args.topology), "--worker"])
               for _ in range(args.workers)]
    signal.signal(signal.SIGTERM, lambda *_: [w.terminate() for w in workers])
    for worker in workers:
        worker.wait()


if __name__ == "__main__":
    main()
