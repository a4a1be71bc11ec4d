"""What an operator watches: a real Prometheus scrapes `keepsrc serve --metrics` while a real Envoy
connects and follows a change; PromQL over Prometheus's HTTP API returns the push, convergence
and reject figures. Plus gRPC health and JSON logs of the same server process."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keepsrc.demo.netns import stop_process
from tests.support.envoy import envoy_path, free_port
from tests.support.envoy_lab import SeqLab, envoy_for, http_backend, seq_lab, tcp_backend
from tests.support.serve import Serve, until
from tests.support.strict import require_binary

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[SeqLab]:
    envoy_path()
    with seq_lab(tmp_path) as lab:
        yield lab


def promql(port: int, query: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def value(results: list[dict[str, object]]) -> float:
    return sum(float(r["value"][1]) for r in results)  # type: ignore[index]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A real Prometheus on loopback; the test writes its scrape target into the returned config."""
    binary = require_binary("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s}\nscrape_configs: []\n")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
        stdout=(tmp_path / "prometheus.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200,
              30, "Prometheus ready")
        yield port, config
    finally:
        stop_process(proc, 15)


def test_prometheus_sees_pushes_convergence_and_rejects(lab: SeqLab, tmp_path: Path,
                                                        prometheus: tuple[int, Path]) -> None:
    prom_port, prom_config = prometheus
    serve = Serve(tmp_path, str(lab.path), "--debounce-ms", "100", "--log-format", "json")
    try:
        until(lambda: "keepsrc_xds_connected" in serve.metrics(), 30, "the metrics page")
        prom_config.write_text(f"""global: {{scrape_interval: 1s}}
scrape_configs:
  - job_name: keepsrc
    static_configs: [{{targets: ["127.0.0.1:{serve.metrics_port}"]}}]
""")
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{prom_port}/-/reload", method="POST"),
                               timeout=5).close()
        with envoy_for(tmp_path, serve.port, "ads-sotw") as envoy:
            envoy.wait_ready()
            until(lambda: http_backend(lab.http_port) == "A", 20, "traffic")
            lab.write(tcp_service="tcp-y")  # a change: the TCP listener moves to another service
            until(lambda: tcp_backend(lab.tcp_port) == "backend:t2", 20, "the change")

            until(lambda: value(promql(prom_port, 'keepsrc_xds_connected{api="sotw"}')) == 1, 30,
                  "Prometheus to see one connected SotW stream")
            until(lambda: value(promql(prom_port, "keepsrc_proxy_convergence_time_seconds_count")) >= 1, 30,
                  "a convergence observed")
            pushes = {r["metric"]["type"]: float(r["value"][1])  # type: ignore[index]
                      for r in promql(prom_port, "keepsrc_xds_pushes_total")}
            # Every type was pushed at connect; the change pushed clusters and listeners again.
            assert pushes["cluster"] >= 2 and pushes["listener"] >= 2 and pushes["endpoint"] >= 1, pushes
            p99 = promql(prom_port, "histogram_quantile(0.99, sum by (le) "
                                    "(keepsrc_proxy_convergence_time_seconds_bucket))")
            assert 0 < value(p99) < 30
            assert value(promql(prom_port, 'keepsrc_xds_push_time_seconds_count{type="listener"}')) >= 2
            assert value(promql(prom_port, 'keepsrc_xds_config_size_bytes_sum{type="cluster"}')) > 0
            assert value(promql(prom_port, "keepsrc_xds_rejects_total")) == 0
            # The start and the change: two good loads, each timed.
            assert value(promql(prom_port, 'keepsrc_topology_reloads_total{result="ok"}')) == 2
            assert value(promql(prom_port, "keepsrc_topology_build_seconds_count")) == 2
        until(lambda: 'keepsrc_xds_connected{api="sotw"} 0.0' in serve.metrics(), 20, "the disconnect")
    finally:
        serve.stop()
    # JSON logs: one object per line; ACK lines carry the node, type, version and nonce as fields.
    lines = [json.loads(line) for line in serve.log.read_text().splitlines() if line.startswith("{")]
    acks = [line for line in lines if line["message"].startswith("node ingress: ACK ")]
    assert acks and all({"node", "type", "version", "nonce"} <= set(line) for line in acks)
    assert {line["type"] for line in acks} >= {"cluster", "listener", "route", "endpoint"}


def test_health_is_not_serving_until_a_topology_is_loaded(lab: SeqLab, tmp_path: Path) -> None:
    """A topology that fails to load on start stops `serve`; a library user's empty cache says
    NOT_SERVING and refuses streams until the first snapshots, which the server test covers.
    Here: a loaded server says SERVING for "" and for the ADS service."""
    serve = Serve(tmp_path, str(lab.path))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{serve.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving(service: str) -> bool:
                response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

            until(lambda: serving(""), 30, "SERVING")
            assert serving("envoy.service.discovery.v3.AggregatedDiscoveryService")
    finally:
        serve.stop()
