"""Prometheus metrics of the xDS server, in istiod's vocabulary with a `keepsrc_` prefix.

No label carries a node id: a fleet churns through node ids, and a label per id would grow the
registry without bound. Labels are the xDS API (sotw/delta) or the resource type (cluster,
endpoint, listener, route), both fixed sets.

The page is rendered by prometheus_client's own HTTP server, on its own thread: rendering is
synchronous and must not stall the event loop that serves the streams.

With `serve --workers N` the workers run in prometheus_client's multiprocess mode (the supervisor
sets PROMETHEUS_MULTIPROC_DIR before they import this module): each writes its values to files,
and the supervisor's page sums them, so every figure means what it means with one process.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

# Push and convergence times span a local ADS push (ms) to a fleet of thousands (seconds).
_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Response sizes: one endpoint (~100 B) to a whole large CDS (tens of MB).
_SIZE_BUCKETS = (1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8)

# livesum: the streams of the workers alive now (a dead worker's are gone with it).
XDS_CONNECTED = Gauge("keepsrc_xds_connected", "xDS streams open now.", ["api"], multiprocess_mode="livesum")
for _api in ("sotw", "delta"):
    # Listed at 0 from the start: in multiprocess mode a series nobody set is not on the page at all.
    XDS_CONNECTED.labels(_api)
XDS_PUSHES = Counter("keepsrc_xds_pushes", "xDS responses sent.", ["type"])
XDS_PUSH_TIME = Histogram(
    "keepsrc_xds_push_time_seconds",
    "From the topology change (or request) that made a response necessary to its write.",
    ["type"], buckets=_TIME_BUCKETS)
PROXY_CONVERGENCE_TIME = Histogram(
    "keepsrc_proxy_convergence_time_seconds",
    "From a topology change (or a stream's first request) to the Envoy ACKing every type of it.",
    buckets=_TIME_BUCKETS)
XDS_REJECTS = Counter("keepsrc_xds_rejects", "NACKs received.", ["type"])
XDS_DENIED = Counter("keepsrc_xds_denied", "Streams refused because the client's identity may not have its node.")
XDS_CONFIG_SIZE = Histogram("keepsrc_xds_config_size_bytes", "Size of each xDS response sent.", ["type"],
                            buckets=_SIZE_BUCKETS)
TOPOLOGY_RELOADS = Counter("keepsrc_topology_reloads", "Topology loads, by result (ok, invalid).", ["result"])
TOPOLOGY_BUILD_TIME = Histogram("keepsrc_topology_build_seconds",
                                "Time to load, validate and build a topology into snapshots.",
                                buckets=_TIME_BUCKETS)


class _Unrecorded:
    """Stands in for a metric a worker must not record."""

    def labels(self, *_values: str) -> _Unrecorded:
        return self

    def inc(self, _amount: float = 1) -> None:
        """Nothing: another worker records it."""

    def observe(self, _amount: float) -> None:
        """Nothing: another worker records it."""


def for_worker(index: int) -> None:
    """Every worker loads the topology, but a load is one event for the server: the first worker
    alone counts loads and their build time, as one process would."""
    global TOPOLOGY_RELOADS, TOPOLOGY_BUILD_TIME
    if index:
        TOPOLOGY_RELOADS = TOPOLOGY_BUILD_TIME = _Unrecorded()  # type: ignore[assignment]


def serve_metrics(address: str, multiprocess_dir: Path | None = None) -> None:
    """Serve /metrics on `address` ('host:port') from a daemon thread; raises OSError if it cannot bind.
    `multiprocess_dir`: serve the sum of the workers' metrics written there, not this process's."""
    registry = None
    if multiprocess_dir is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(multiprocess_dir))
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry or REGISTRY)


def mark_process_dead(pid: int, multiprocess_dir: Path) -> None:
    """A worker exited: its live gauges (open streams) no longer count."""
    multiprocess.mark_process_dead(pid, str(multiprocess_dir))
