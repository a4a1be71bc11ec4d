"""`keepsrc serve`: the xDS server for a topology file, with hot reload, SIGHUP and clean SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from keepsrc.server import logs, metrics
from keepsrc.server.cache import SnapshotCache
from keepsrc.server.reload import TopologySource
from keepsrc.server.service import start

log = logging.getLogger("keepsrc.server")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topology", nargs="?", type=Path,
                        help="topology YAML to serve and watch (default: the built-in quickstart example)")
    parser.add_argument("--listen", default="127.0.0.1:18000", metavar="HOST:PORT",
                        help="address of the xDS gRPC server (default: %(default)s)")
    parser.add_argument("--debounce-ms", type=int, default=200, metavar="MS",
                        help="gather a burst of changes of the file for at most this long before reloading; "
                        "a single save reloads ~50 ms after it (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="info logs every ACK and NACK per node (default: %(default)s)")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one object per line; ACK/NACK lines carry node, type, version and nonce")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: none)")


def run_serve(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, args.log_format)
    if args.metrics:
        try:
            metrics.serve_metrics(args.metrics)
        except (OSError, ValueError) as exc:
            log.error("cannot serve metrics on %s: %s", args.metrics, exc)
            return 1
        log.info("metrics on http://%s/metrics", args.metrics)
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    cache = SnapshotCache()
    source = TopologySource(cache, args.topology)
    if not source.load():
        return 2
    try:
        server = await start(cache, args.listen)
    except OSError as exc:
        log.error("%s", exc)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, source)
    watcher = asyncio.create_task(source.watch(stop, args.debounce_ms))
    await stop.wait()
    log.info("shutting down: closing every stream")
    await server.stop(grace=1.0)
    await watcher
    return 0


def _on_sighup(source: TopologySource) -> None:
    log.info("SIGHUP; reloading %s", source.name)
    source.reload_soon(force=True)  # off the event loop, so the streams keep being served
