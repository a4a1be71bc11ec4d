"""keepsrc replicas on a real etcd (3.4, Debian's etcd-server): `keepsrc push`, what every replica
does with what is stored (valid, invalid, nothing yet), and the watch through etcd restarts, lost
members and TLS. Replicas are `python -m keepsrc.server --store etcd://...` processes; what they
serve is read the way an operator reads it: gRPC health, CSDS (`keepsrc status`), an xDS stream.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from keepsrc.server.status import fetch_replica
from keepsrc.snapshots.builder import build_snapshots
from keepsrc.snapshots.snapshot import LISTENER
from keepsrc.store import parse_etcd_url
from keepsrc.topology import check_topology_text
from tests.support.etcd_lab import ROOT, EtcdCluster, Replica, etcd_cluster, keepsrc, make_certs, push, wait_for
from tests.support.quickstart import QUICKSTART, web_on
from tests.support.xds_client import XdsClient

KEY = "/keepsrc/test/topology.yaml"
ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


def listener_version(text: str, node: str = "ingress") -> str:
    topology, diagnostics = check_topology_text(text)
    assert topology is not None, diagnostics
    return build_snapshots(topology)[node].version(LISTENER)


def revision_of(replica: Replica) -> int | None:
    return fetch_replica(replica.target).revision


def xds_versions(target: str, node: str = "ingress") -> dict[str, str]:
    """What a fresh xDS client (ADS, SotW) is served: type URL -> version; raises grpc.aio.AioRpcError."""
    async def main() -> dict[str, str]:
        async with grpc.aio.insecure_channel(target) as channel:
            client = XdsClient(channel, node)
            task = asyncio.create_task(client.run())
            try:
                await client.wait_for(lambda c: LISTENER in c.versions or task.done(), timeout=10)
                if task.done():
                    task.result()  # the stream's end, as an exception
                return dict(client.versions)
            finally:
                client.cancel()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    return asyncio.run(main())


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path) as cluster:
        yield cluster


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


# -- keepsrc push ---------------------------------------------------------------------------------
def test_push_validates_as_validate_does_then_writes_and_prints_the_revision(etcd: EtcdCluster,
                                                                              tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", QUICKSTART.replace("protocol: tcp", "protocol: tpc"))
    validate = keepsrc("validate", str(bad))
    pushed = keepsrc("push", str(bad), "--store", etcd.url())
    assert validate.returncode == pushed.returncode == 1
    assert validate.stderr in pushed.stderr, "push must print exactly what validate prints"
    assert f"{bad}:" in pushed.stderr and "did you mean 'tcp'" in pushed.stderr
    assert etcd.etcdctl("get", KEY).stdout == "", "an invalid file must not be written"

    good = write(tmp_path, "good.yaml", QUICKSTART)
    first = push(good, etcd)
    second = push(write(tmp_path, "next.yaml", web_on(8081)), etcd)
    assert second > first
    assert etcd.etcdctl("get", KEY, "--print-value-only").stdout.strip() == web_on(8081).strip()


def test_concurrent_pushes_from_one_revision_exactly_one_wins(etcd: EtcdCluster, tmp_path: Path) -> None:
    base = push(write(tmp_path, "base.yaml", QUICKSTART), etcd)
    files = [write(tmp_path, f"edit-{i}.yaml", web_on(8081 + i)) for i in range(4)]
    # Four operators who all edited revision `base` push at once.
    procs = [subprocess.Popen([sys.executable, "-m", "keepsrc", "push", str(f), "--store", etcd.url(),
                               "--if-revision", str(base)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for f in files]
    results = [(p.wait(60), *p.communicate()) for p in procs]
    winners = [i for i, (code, _, _) in enumerate(results) if code == 0]
    assert len(winners) == 1, results
    for i, (code, _, stderr) in enumerate(results):
        if i != winners[0]:
            assert code == 3 and "someone else pushed" in stderr, (code, stderr)
    assert etcd.etcdctl("get", KEY, "--print-value-only").stdout.strip() == web_on(8081 + winners[0]).strip()


def test_a_topology_over_etcds_request_limit_is_refused_with_a_clear_message(etcd: EtcdCluster,
                                                                              tmp_path: Path) -> None:
    services = "\n".join(f"  svc-{i}: {{endpoints: [\"10.{i // 250 % 250}.{i % 250}.1:8080\", "
                         f"\"10.{i // 250 % 250}.{i % 250}.2:8080\", \"10.{i // 250 % 250}.{i % 250}.3:8080\"]}}"
                         for i in range(19_000))
    big = write(tmp_path, "big.yaml", QUICKSTART.replace("services:\n", f"services:\n{services}\n", 1))
    assert big.stat().st_size > 1.5 * 1024 * 1024
    result = keepsrc("push", str(big), "--store", etcd.url())
    assert result.returncode == 2, result.stdout + result.stderr
    assert "max-request-bytes" in result.stderr and "1.5 MiB" in result.stderr, result.stderr
    assert etcd.etcdctl("get", KEY).stdout == ""


# -- replicas -------------------------------------------------------------------------------------
def test_a_fresh_replica_with_an_empty_store_refuses_streams_until_a_push(etcd: EtcdCluster,
                                                                          tmp_path: Path) -> None:
    with Replica(tmp_path, "fresh", etcd.url()) as replica:
        assert replica.health() == replica.health(ADS_SERVICE) == "NOT_SERVING"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            xds_versions(replica.target)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "holds no topology yet" in replica.log()

        revision = push(write(tmp_path, "t.yaml", QUICKSTART), etcd)
        replica.wait_serving()
        assert replica.health(ADS_SERVICE) == "SERVING"
        assert xds_versions(replica.target)[LISTENER] == listener_version(QUICKSTART)
        assert revision_of(replica) == revision
        status = keepsrc("status", "--xds", replica.target)
        assert f"store revision {revision}" in status.stdout, status.stdout


def test_invalid_content_written_behind_keepsrcs_back_is_refused_by_every_replica(etcd: EtcdCluster,
                                                                                   tmp_path: Path) -> None:
    good = push(write(tmp_path, "good.yaml", QUICKSTART), etcd)
    invalid = QUICKSTART.replace("protocol: tcp", "protocol: tpc").replace("apiVersion: keepsrc/v1",
                                                                           "apiVersion: keepsrc/v2")
    # What `keepsrc validate` says about those bytes, which each replica must say, naming the key.
    expected = keepsrc("validate", str(write(tmp_path, "invalid.yaml", invalid))).stderr
    with Replica(tmp_path, "a", etcd.url()) as a, Replica(tmp_path, "b", etcd.url()) as b:
        for replica in (a, b):
            replica.wait_serving()
        etcd.put(KEY, invalid.encode())
        bad = int(etcd.etcdctl("get", KEY, "-w", "fields").stdout.split('"ModRevision" : ')[1].split()[0])
        name = f"etcd://{etcd.hosts}{KEY}@{bad}"
        lines = [line.replace(str(tmp_path / "invalid.yaml"), name) for line in expected.splitlines()
                 if line.startswith(str(tmp_path / "invalid.yaml") + ":") and ": error: " in line]
        assert len(lines) >= 2
        for replica in (a, b):
            wait_for(lambda r=replica: f"{name} is invalid" in r.log(), 20, f"{replica.name} refused it", replica.log)
            for line in lines:
                assert line in replica.log(), f"{replica.name} does not say {line!r}:\n{replica.log()}"
            # The last good topology stays, at its revision.
            assert revision_of(replica) == good
            assert xds_versions(replica.target)[LISTENER] == listener_version(QUICKSTART)
        status = keepsrc("status", "--xds", a.target, "--xds", b.target)
        assert status.stdout.count(f"store revision {good}") == 2, status.stdout


def test_a_replica_follows_pushes_while_each_member_of_a_three_member_cluster_is_killed(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path, size=3) as cluster, Replica(tmp_path, "a", cluster.url()) as replica:
        push(write(tmp_path, "t.yaml", QUICKSTART), cluster)
        replica.wait_serving()
        leader = cluster.leader()
        order = [leader, *(m for m in cluster.members if m is not leader)]  # the leader first
        for i, member in enumerate(order):
            cluster.kill(member)
            text = web_on(9000 + i)
            revision = push(write(tmp_path, f"t{i}.yaml", text), cluster)
            wait_for(lambda revision=revision: revision_of(replica) == revision, 30,
                     f"the replica at revision {revision} with {member.name} down", replica.log)
            assert xds_versions(replica.target)[LISTENER] == listener_version(text)
            cluster.start_member(member)
            cluster.wait_healthy()


def test_an_etcd_restart_keeps_the_replica_serving_and_its_watch_resumes(etcd: EtcdCluster,
                                                                          tmp_path: Path) -> None:
    with Replica(tmp_path, "a", etcd.url()) as replica:
        first = push(write(tmp_path, "t.yaml", QUICKSTART), etcd)
        replica.wait_serving()
        member = etcd.members[0]
        etcd.kill(member)
        assert xds_versions(replica.target)[LISTENER] == listener_version(QUICKSTART)
        assert replica.health() == "SERVING" and revision_of(replica) == first
        etcd.start_member(member)
        etcd.wait_healthy()
        second = push(write(tmp_path, "t2.yaml", web_on(8081)), etcd)
        wait_for(lambda: revision_of(replica) == second, 30, "the push after the restart", replica.log)


def test_mutual_tls_to_etcd(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    with etcd_cluster(tmp_path, certs=certs) as cluster:
        path = write(tmp_path, "t.yaml", QUICKSTART)
        plain = keepsrc("push", str(path), "--store", cluster.url(), "--etcd-ca", str(certs.ca))
        assert plain.returncode == 2 and "not pushed" in plain.stderr, "etcd asks for a client certificate"
        revision = push(path, cluster)  # with the client certificate (cluster.tls_args)
        with Replica(tmp_path, "tls", cluster.url(), cluster.tls_args()) as replica:
            replica.wait_serving()
            assert revision_of(replica) == revision


def test_store_urls_are_checked() -> None:
    assert parse_etcd_url("etcd://10.0.0.1:2379,etcd-2:2379/keepsrc/prod") == (
        [("10.0.0.1", 2379), ("etcd-2", 2379)], "/keepsrc/prod")
    for bad in ("etcd://10.0.0.1:2379", "etcd://10.0.0.1/keepsrc", "etcd://:2379/x", "http://h:1/x"):
        with pytest.raises(ValueError):
            parse_etcd_url(bad)
    result = keepsrc("push", "examples/quickstart.yaml", "--store", "etcd://nohost/keepsrc")
    assert result.returncode == 2 and "is not HOST:PORT" in result.stderr
