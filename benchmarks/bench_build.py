"""build_snapshots on a generated topology: 5,000 services x 10 endpoints (target < 250 ms).

    .venv/bin/python benchmarks/bench_build.py [--services 5000] [--endpoints 10] [--repeat 5]

Baseline, measured in the same run: constructing and serializing the same Cluster and
ClusterLoadAssignment messages with bare protobuf calls and no keepsrc logic, so the ratio is
what keepsrc's model, validation-free building, hashing and snapshot bookkeeping cost on top.
Loading has its own baselines: PyYAML's C loader and yaml-rs reading the same file into plain
dicts (no line numbers, no validation). A valid file is answered by the plain pass (yaml-rs and the
schema); the precise pass alone (libyaml's nodes, every finding placed) is what a file with a
finding costs on top. The same file doubled shows that loading grows linearly.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml
import yaml_rs
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keepsrc.snapshots import builder
from keepsrc.topology import (
    Listener,
    Protocol,
    Proxy,
    Route,
    Service,
    SocketAddress,
    Topology,
    Xff,
    check_topology_text,
)
from keepsrc.topology.loader import check_plain, check_precisely, cycle_collection_paused


def generate(services: int, endpoints: int, proxies: int) -> Topology:
    svc = {
        f"svc-{i}": Service(
            f"svc-{i}",
            tuple(SocketAddress(f"10.{i // 250 % 250}.{i % 250}.{j + 1}", 8080) for j in range(endpoints)),
        )
        for i in range(services)
    }
    names = list(svc)
    per_proxy = max(1, services // proxies)
    prox = {}
    for p in range(proxies):
        mine = names[p * per_proxy : (p + 1) * per_proxy]
        listeners = [
            Listener(f"tcp-{k}", SocketAddress("0.0.0.0", 10000 + k), Protocol.TCP, service=name)
            for k, name in enumerate(mine[: len(mine) // 2])
        ]
        listeners.append(
            Listener("http", SocketAddress("0.0.0.0", 8000), Protocol.HTTP,
                     routes=tuple(Route(f"/{n}", n) for n in mine[len(mine) // 2 :]), xff=Xff(trusted_hops=1))
        )
        prox[f"proxy-{p}"] = Proxy(f"proxy-{p}", tuple(listeners))
    return Topology(services=svc, proxies=prox)


def to_yaml(topology: Topology) -> str:
    lines = ["apiVersion: keepsrc/v1", "services:"]
    for s in topology.services.values():
        lines.append(f"  {s.name}:")
        lines.append("    endpoints: [" + ", ".join(f'"{e}"' for e in s.endpoints) + "]")
    lines.append("proxies:")
    for p in topology.proxies.values():
        lines += [f"  {p.name}:", "    listeners:"]
        for listener in p.listeners:
            lines += [f"      - name: {listener.name}", f"        address: {listener.address}",
                      f"        protocol: {listener.protocol}"]
            if listener.service:
                lines.append(f"        service: {listener.service}")
            else:
                lines.append("        routes:")
                lines += [f"          - {{prefix: {r.prefix}, service: {r.service}}}" for r in listener.routes]
    return "\n".join(lines) + "\n"


def baseline(topology: Topology) -> None:
    """The same clusters and endpoints with bare protobuf: no model, no hashing, no snapshot."""
    for s in topology.services.values():
        cluster_pb2.Cluster(
            name=s.name, type=cluster_pb2.Cluster.EDS, connect_timeout={"seconds": 1}
        ).SerializeToString()
        endpoint_pb2.ClusterLoadAssignment(
            cluster_name=s.name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=e.host,
                                                                                         port_value=e.port))))
                for e in s.endpoints])],
        ).SerializeToString()


def clear_caches() -> None:
    for fn in (builder._cluster, builder._endpoints, builder._listener, builder._route):
        fn.cache_clear()


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Each run with the cycle collector paused, as the server loads and builds (reload.py): the
    timings are then of the work, not of collections over whatever earlier runs left alive."""
    runs = []
    for _ in range(repeat):
        with cycle_collection_paused():
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--proxies", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    topology = generate(args.services, args.endpoints, args.proxies)
    text = to_yaml(topology)

    base = timed(lambda: baseline(topology), args.repeat)
    fresh = [generate(args.services, args.endpoints, args.proxies) for _ in range(args.repeat)]
    cold = [0.0] * args.repeat
    for i, topo in enumerate(fresh):  # new model objects and empty memo: nothing computed before
        clear_caches()
        with cycle_collection_paused():
            start = time.perf_counter()
            builder.build_snapshots(topo)
            cold[i] = time.perf_counter() - start
    warm = timed(lambda: builder.build_snapshots(topology), args.repeat)
    load = timed(lambda: check_topology_text(text, "generated.yaml"), args.repeat)
    loaded, diagnostics = check_topology_text(text, "generated.yaml")
    # The plain pass answers for this file: the timings below are of it, not of a fallback.
    assert loaded is not None and check_plain(text, "generated.yaml") is not None, diagnostics[:3]
    precise = timed(lambda: check_precisely(text, "generated.yaml"), args.repeat)
    # Baselines for loading: parsers to plain dicts, no line numbers and no validation.
    parse = timed(lambda: yaml.load(text, Loader=yaml.CSafeLoader), args.repeat)
    parse_rs = timed(lambda: yaml_rs.loads(text, parse_datetime=False), args.repeat)
    doubled = to_yaml(generate(args.services * 2, args.endpoints, args.proxies * 2))
    load_doubled = timed(lambda: check_topology_text(doubled, "doubled.yaml"), args.repeat)

    med = statistics.median
    resources = sum(len(r) for s in builder.build_snapshots(topology).values() for r in s.resources.values())
    print(f"topology: {args.services} services x {args.endpoints} endpoints, {args.proxies} proxies, "
          f"{resources} resources, {len(text) / 1e6:.1f} MB of YAML")
    print(f"baseline (bare protobuf, clusters+endpoints): median {med(base) * 1e3:8.1f} ms")
    print(f"build_snapshots, cold (no memo):              median {med(cold) * 1e3:8.1f} ms  "
          f"= {med(cold) / med(base):.2f}x baseline  (target < 250 ms)")
    print(f"build_snapshots, unchanged topology (memo):   median {med(warm) * 1e3:8.1f} ms  "
          f"= {med(warm) / med(base):.2f}x baseline")
    print(f"baseline (PyYAML C loader to dicts):          median {med(parse) * 1e3:8.1f} ms")
    print(f"baseline (yaml-rs to dicts):                  median {med(parse_rs) * 1e3:8.1f} ms")
    print(f"load + validate the YAML (plain pass):        median {med(load) * 1e3:8.1f} ms  "
          f"= {med(load) / med(parse):.2f}x PyYAML, {med(load) / med(parse_rs):.2f}x yaml-rs  (target < 150 ms)")
    print(f"the precise pass alone (a file with findings): median {med(precise) * 1e3:7.1f} ms  "
          f"= {med(precise) / med(parse):.2f}x PyYAML")
    print(f"load + validate, the file doubled:            median {med(load_doubled) * 1e3:8.1f} ms  "
          f"= {med(load_doubled) / med(load):.2f}x the single file (linear: 2x; {len(doubled) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
