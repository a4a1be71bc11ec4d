"""The memory baseline for bench_ads.py: a bare grpc.aio ADS server that holds each stream open,
reading requests and answering none, with the same server options as keepsrc. What an idle
stream costs here is grpc's own share, which no control-plane code can go below.

    python benchmarks/ads_baseline_server.py 127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

SERVER_OPTIONS = [("grpc.server.max_pending_requests", 100_000),
                  ("grpc.server.max_pending_requests_hard_limit", 100_000),
                  ("grpc.so_reuseport", 0), ("grpc.keepalive_time_ms", 60_000),
                  ("grpc.http2.min_ping_interval_without_data_ms", 10_000)]


async def hold(requests: object, _context: grpc.aio.ServicerContext) -> None:
    async for _request in requests:  # type: ignore[attr-defined]
        pass
    return
    yield  # a response-streaming handler that never responds


async def main(address: str) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {"StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            hold, request_deserializer=DiscoveryRequest.FromString, response_serializer=bytes)},
    )])
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
