"""Two keepsrc replicas on one etcd, and a real Envoy 1.40 whose bootstrap lists both
(`keepsrc bootstrap --xds A --xds B`): a push reaches both and the Envoy; a replica that crashes,
an etcd that goes away for 10 s and a replica that lags are things the Envoy does not notice:
no listener drained, no cluster re-warmed, no version change, no failed request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepsrc.server.status import fetch_replica
from keepsrc.snapshots.bootstrap import xds_bootstrap
from keepsrc.snapshots.render import to_dict
from keepsrc.topology.model import SocketAddress
from tests.support.envoy import Envoy, envoy_path
from tests.support.envoy_lab import (
    ADS_FLAVOURS,
    ALL,
    FLAVOURS,
    SeqLab,
    Traffic,
    csds,
    csds_or_empty,
    http_backend,
    seq_lab,
    stat0,
    tcp_backend,
)
from tests.support.etcd_lab import EtcdCluster, Replica, ReplicaThread, etcd_cluster, push, wait_for

NODE = "ingress"
# What moves when Envoy applies anything: none may move when it only changes replica.
UPDATE_COUNTERS = (
    "cluster_manager.cds.update_success", "listener_manager.lds.update_success",
    "http.http-in.rds.http-in.update_success", "cluster.web-a.update_success",
    "listener_manager.listener_modified", "listener_manager.listener_in_place_updated",
    "listener_manager.listener_added", "listener_manager.listener_removed",
    "cluster_manager.cluster_modified", "cluster_manager.cluster_added", "cluster_manager.cluster_removed",
)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[SeqLab]:
    envoy_path()  # skip (or fail under KEEPSRC_STRICT=1) before starting anything
    with seq_lab(tmp_path) as lab:
        yield lab


@pytest.fixture
def etcd(tmp_path: Path, lab: SeqLab) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path) as cluster:
        yield cluster


def envoy_on(workdir: Path, ports: list[int], flavour: str, node: str = NODE) -> Envoy:
    """An Envoy whose bootstrap lists every replica, as `keepsrc bootstrap --xds A --xds B` writes it;
    served the proxy entry `ingress` (its node.cluster) whatever its node id."""
    api, transport = FLAVOURS[flavour]
    addresses = [SocketAddress("127.0.0.1", port) for port in ports]
    config = to_dict(xds_bootstrap(node, addresses, SocketAddress("127.0.0.1", 0), api, transport, NODE))
    return Envoy(config, workdir, name=f"envoy-{node}")


def counters(envoy: Envoy) -> dict[str, int]:
    return {name: stat0(envoy, name) for name in UPDATE_COUNTERS}


def serving(target: str, node: str = NODE) -> dict[str, str] | None:
    """type URL -> ACKed version, when CSDS at `target` says `node` is SYNCED on every type."""
    state = csds_or_empty(target).get(node, {})
    if set(state) != set(ALL) or any(s.status != "SYNCED" for s in state.values()):
        return None
    return {t: s.version for t, s in state.items()}


def on_replica(replicas: list[str], node: str = NODE) -> str:
    """The replica the Envoy's stream is on (the one whose CSDS knows the node)."""
    holding = [target for target in replicas if node in csds_or_empty(target)]
    assert len(holding) == 1, f"the Envoy should be on exactly one replica: {holding}"
    return holding[0]


def converged(envoy: Envoy, lab: SeqLab, replicas: list[str], tcp: str, node: str = NODE) -> str:
    """Wait until the Envoy carries traffic as the topology says and a replica has it SYNCED; which."""
    envoy.wait_ready()
    envoy.wait_until(lambda: http_backend(lab.http_port) == "A", what="HTTP through http-in")
    envoy.wait_until(lambda: tcp_backend(lab.tcp_port) == tcp, what=f"TCP through tcp-in to {tcp}")
    envoy.wait_until(lambda: any(serving(t, node) for t in replicas), what="a replica says SYNCED")
    return on_replica(replicas, node)


def revision(target: str) -> int | None:
    return fetch_replica(target).revision


@pytest.mark.parametrize("flavour", ADS_FLAVOURS)
def test_a_push_reaches_every_replica_and_a_killed_replica_goes_unnoticed(
        flavour: str, lab: SeqLab, etcd: EtcdCluster, tmp_path: Path) -> None:
    push(lab.path, etcd)
    with Replica(tmp_path, "a", etcd.url()) as a, Replica(tmp_path, "b", etcd.url()) as b:
        replicas = {a.target: a, b.target: b}
        for replica in replicas.values():
            replica.wait_serving()
        with envoy_on(tmp_path, [a.port, b.port], flavour) as envoy:
            converged(envoy, lab, list(replicas), "backend:t1")

            lab.write(tcp_service="tcp-y")
            pushed = push(lab.path, etcd)
            for target in replicas:
                wait_for(lambda target=target: revision(target) == pushed, 20, f"{target} at the pushed revision")
            on = converged(envoy, lab, list(replicas), "backend:t2")
            held, before = serving(on), counters(envoy)
            other = next(t for t in replicas if t != on)

            ok = ("A",)
            with Traffic(lambda: http_backend(lab.http_port), lambda answer: answer in ok) as http, \
                    Traffic(lambda: tcp_backend(lab.tcp_port), lambda answer: answer == "backend:t2") as tcp:
                time.sleep(0.5)
                replicas[on].kill()  # SIGKILL: the Envoy sees its connection reset
                envoy.wait_until(lambda: serving(other) is not None, timeout=30,
                                 what="the Envoy reconnected to the other replica, SYNCED")
                time.sleep(1)  # room for anything the other replica might (wrongly) send
            assert serving(other) == held, "the other replica serves other versions"
            assert counters(envoy) == before, "the Envoy applied something when it changed replica"
            assert stat0(envoy, "listener_manager.total_listeners_draining") == 0
            assert stat0(envoy, "cluster_manager.warming_clusters") == 0
            assert http.answers and tcp.answers
            assert http.failures == [] and tcp.failures == [], (http.failures, tcp.failures)


def test_etcd_away_for_10_s_changes_nothing_and_a_push_after_it_reaches_every_envoy(
        lab: SeqLab, etcd: EtcdCluster, tmp_path: Path) -> None:
    push(lab.path, etcd)
    with Replica(tmp_path, "a", etcd.url()) as a, Replica(tmp_path, "b", etcd.url()) as b:
        for replica in (a, b):
            replica.wait_serving()
        work_a, work_b = tmp_path / "ea", tmp_path / "eb"
        work_a.mkdir()
        work_b.mkdir()
        # Two Envoys of the fleet `ingress`, SotW and delta, each listing both replicas.
        with envoy_on(work_a, [a.port, b.port], "ads-sotw", "ingress-1") as first, \
                envoy_on(work_b, [b.port, a.port], "ads-delta", "ingress-2") as second:
            envoys = (first, second)
            for envoy, node in zip(envoys, ("ingress-1", "ingress-2"), strict=True):
                converged(envoy, lab, [a.target, b.target], "backend:t1", node)
            connections = [stat0(e, "cluster.keepsrc_xds.upstream_cx_total") for e in envoys]
            before = [counters(e) for e in envoys]
            streams = {t: set(csds(t)) for t in (a.target, b.target)}

            member = etcd.members[0]
            with Traffic(lambda: tcp_backend(lab.tcp_port), lambda answer: answer == "backend:t1") as traffic:
                etcd.kill(member)
                time.sleep(10)
                for replica in (a, b):
                    assert replica.running and replica.health() == "SERVING", replica.log()
            assert traffic.answers and traffic.failures == [], traffic.failures
            assert [stat0(e, "cluster.keepsrc_xds.upstream_cx_total") for e in envoys] == connections, \
                "an Envoy lost its stream while etcd was away"
            assert {t: set(csds(t)) for t in (a.target, b.target)} == streams
            assert [counters(e) for e in envoys] == before

            etcd.start_member(member)
            etcd.wait_healthy()
            lab.write(tcp_service="tcp-y")
            pushed = push(lab.path, etcd)
            for envoy in envoys:
                envoy.wait_until(lambda: tcp_backend(lab.tcp_port) == "backend:t2", what="the push applied")
            for target in (a.target, b.target):
                wait_for(lambda target=target: revision(target) == pushed, 20, f"{target} at the pushed revision")


def test_an_envoy_that_reconnects_to_a_lagging_replica_keeps_its_newer_config(
        lab: SeqLab, etcd: EtcdCluster, tmp_path: Path) -> None:
    first = push(lab.path, etcd)
    lagging = ReplicaThread(etcd.url())
    # The Envoy lists both; it connects to `a` while the other is not listening yet.
    with Replica(tmp_path, "a", etcd.url()) as a, envoy_on(tmp_path, [a.port, lagging.port], "ads-sotw") as envoy:
        a.wait_serving()
        assert converged(envoy, lab, [a.target], "backend:t1") == a.target
        with lagging:
            wait_for(lambda: lagging.cache.revision == first, 20, "the lagging replica loaded the topology")
            lagging.hold()
            lab.write(tcp_service="tcp-y")
            second = push(lab.path, etcd)
            converged(envoy, lab, [a.target], "backend:t2")
            held, before = serving(a.target), counters(envoy)
            assert revision(a.target) == second and revision(lagging.target) == first

            with Traffic(lambda: tcp_backend(lab.tcp_port), lambda answer: answer == "backend:t2") as traffic:
                a.kill()
                envoy.wait_until(lambda: NODE in csds_or_empty(lagging.target), timeout=30,
                                 what="the Envoy reconnected to the lagging replica")
                time.sleep(2)  # the lagging replica has time to (wrongly) send its older topology
                assert counters(envoy) == before, "the Envoy was moved back to the older topology"
                assert revision(lagging.target) == first

                lagging.release()
                envoy.wait_until(lambda: serving(lagging.target) == held, timeout=20,
                                 what="the caught-up replica has the Envoy SYNCED on what it holds")
            assert revision(lagging.target) == second
            assert counters(envoy) == before, "catching up must send the Envoy nothing it holds"
            assert traffic.answers and traffic.failures == [], traffic.failures

            lab.write(tcp_service="tcp-x")  # and it serves the next push as any replica does
            push(lab.path, etcd)
            envoy.wait_until(lambda: tcp_backend(lab.tcp_port) == "backend:t1", what="the next push applied")
