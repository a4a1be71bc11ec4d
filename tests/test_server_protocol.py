"""The xDS server's protocol, against the in-repo client (fast; real Envoys are in test_server_envoy.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse
from envoy.service.status.v3 import csds_pb2

from keepsrc.server import SnapshotCache, TopologySource, csds, start
from keepsrc.server.cache import Entry, state_version
from keepsrc.server.wire import next_nonce, text
from keepsrc.snapshots.bootstrap import XDS_CLUSTER
from keepsrc.snapshots.builder import build_snapshots
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_ORDER, Snapshot
from keepsrc.topology import Listener, Protocol, Proxy, Route, Service, SocketAddress, Topology
from tests.support.xds_client import XdsClient, running

ALL = (CLUSTER, ENDPOINT, LISTENER, ROUTE)


def topology(tcp_service: str = "a", a_port: int = 9001, routes: tuple[str, ...] = ("/",),
             extra_proxy: bool = False) -> Topology:
    services = {
        "a": Service("a", (SocketAddress("127.0.0.1", a_port),)),
        "b": Service("b", (SocketAddress("127.0.0.2", 9002),)),
        "c": Service("c", (SocketAddress("127.0.0.3", 9003),)),
    }
    listeners = (
        Listener("tcp-in", SocketAddress("127.0.0.1", 10000), Protocol.TCP, service=tcp_service),
        Listener("http-in", SocketAddress("127.0.0.1", 10080), Protocol.HTTP,
                 routes=tuple(Route(p, "b") for p in routes)),
    )
    proxies = {"edge": Proxy("edge", listeners)}
    if extra_proxy:
        proxies["other"] = Proxy("other", listeners[:1])
    used = {tcp_service, "b"}
    return Topology({n: s for n, s in services.items() if n in used}, proxies)


def with_server(test: Callable[[SnapshotCache, grpc.aio.Channel], Awaitable[None]],
                snapshots: dict[str, Snapshot] | None = None, timeout: float = 20) -> None:
    async def main() -> None:
        cache = SnapshotCache()
        cache.set_all(build_snapshots(topology()) if snapshots is None else snapshots)
        server = await start(cache, "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                await asyncio.wait_for(test(cache, channel), timeout)
        finally:
            await server.stop(None)

    asyncio.run(main())


def converged(snapshot: Snapshot) -> Callable[[XdsClient], bool]:
    # A type the snapshot has none of is never sent (there is nothing to subscribe to).
    return lambda c: all(c.versions.get(t, state_version({})) == snapshot.version(t) for t in ALL)


def types_of(client: XdsClient, since: int = 0) -> list[str]:
    return [r.type_url for r in client.history[since:]]


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_ads_serves_every_type_and_records_acks(delta: bool) -> None:
    async def test(cache: SnapshotCache, channel: grpc.aio.Channel) -> None:
        snapshot = cache.get("edge")
        assert snapshot is not None
        async with running(XdsClient(channel, "edge", delta=delta)) as client:
            await client.wait_for(converged(snapshot))
            # What arrived is byte for byte what the builder serialized.
            for type_url in ALL:
                held = {n: m.SerializeToString(deterministic=True) for n, m in client.held[type_url].items()}
                assert held == {n: r.body for n, r in snapshot.of_type(type_url).items()}
            status = cache.status["edge"]
            await client.wait_for(lambda _: all(status.of(t).acked == snapshot.version(t) for t in ALL))
            assert status.key == "edge" and status.streams == 1
            assert all(status.of(t).nack is None for t in ALL)
            assert sorted(types_of(client)) == sorted(ALL)  # one response per type, nothing repeated
        await _until(lambda: "edge" not in cache.status)  # disconnected nodes are forgotten

    with_server(test)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_reconnect_gets_nothing_it_already_has(delta: bool) -> None:
    """After a reconnect (or a server restart) the server sends only what changed meanwhile."""
    async def test(cache: SnapshotCache, channel: grpc.aio.Channel) -> None:
        snapshot = cache.get("edge")
        assert snapshot is not None
        async with running(XdsClient(channel, "edge", delta=delta)) as first:
            await first.wait_for(converged(snapshot))
        second = XdsClient(channel, "edge", delta=delta)
        second.carry_over(first)
        async with running(second):
            # Move an endpoint: the first and only response is that endpoint. Had the server
            # resent anything on reconnect, it would have arrived before it on the stream.
            await asyncio.sleep(0.2)
            moved = build_snapshots(topology(a_port=9100))["edge"]
            cache.set("edge", moved)
            await second.wait_for(converged(moved))
            assert types_of(second) == [ENDPOINT]

    with_server(test)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_nack_is_recorded_and_not_resent(delta: bool) -> None:
    """tcp-in is refused (as Envoy refuses one listener and applies the rest)."""
    rejecting = {"on": True}

    def reject(type_url: str, resources: dict[str, object]) -> str | None:
        refused = type_url == LISTENER and "tcp-in" in resources and rejecting["on"]
        return "bad listener: port in use" if refused else None

    async def test(cache: SnapshotCache, channel: grpc.aio.Channel) -> None:
        snapshot = cache.get("edge")
        assert snapshot is not None
        status = cache.status
        # SotW: the one response is refused. Delta: the response of both is refused, then each
        # is sent alone to learn which one the client refuses.
        listener_responses = 3 if delta else 1
        async with running(XdsClient(channel, "edge", delta=delta, reject=reject)) as client:
            await client.wait_for(lambda c: types_of(c).count(LISTENER) == listener_responses)
            await client.wait_for(lambda _: status["edge"].of(LISTENER).nack is not None)
            nack = status["edge"].of(LISTENER).nack
            assert nack is not None
            assert (nack.code, nack.message, nack.version) == (3, "bad listener: port in use",
                                                               snapshot.version(LISTENER))
            assert [r.names for r in client.history if r.type_url == LISTENER] == (
                [("http-in", "tcp-in"), ("http-in",), ("tcp-in",)] if delta else [("http-in", "tcp-in")])
            assert set(client.held[LISTENER]) == ({"http-in"} if delta else set())
            # CSDS (what `keepsrc status` shows) reports the rejection with Envoy's message.
            listener = (await csds_listener_status(channel, "edge"))
            assert listener.config_status == csds_pb2.ERROR
            assert listener.error_state.details == "bad listener: port in use"
            assert listener.error_state.version_info == snapshot.version(LISTENER)
            # An unrelated change goes out; the rejected listener is not sent again.
            moved = build_snapshots(topology(a_port=9100))["edge"]
            cache.set("edge", moved)
            await client.wait_for(lambda c: c.versions.get(ENDPOINT) == moved.version(ENDPOINT))
            assert types_of(client).count(LISTENER) == listener_responses
            assert (await csds_listener_status(channel, "edge")).config_status == csds_pb2.ERROR
            # A changed listener is sent, and accepted.
            rejecting["on"] = False
            fixed = build_snapshots(topology(tcp_service="b"))["edge"]
            cache.set("edge", fixed)
            await client.wait_for(converged(fixed))
            await client.wait_for(lambda _: status["edge"].of(LISTENER).nack is None)
            assert status["edge"].of(LISTENER).acked == fixed.version(LISTENER)
            listener = await csds_listener_status(channel, "edge")
            assert (listener.config_status, listener.version_info) == (csds_pb2.SYNCED, fixed.version(LISTENER))

    with_server(test)


async def csds_listener_status(channel: grpc.aio.Channel, node_id: str) -> csds_pb2.ClientConfig.GenericXdsConfig:
    fetch = channel.unary_unary(
        f"/{csds.SERVICE}/FetchClientStatus",
        request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
        response_deserializer=csds_pb2.ClientStatusResponse.FromString,
    )
    response = await fetch(csds_pb2.ClientStatusRequest())
    (config,) = [c for c in response.config if c.node.id == node_id]
    (listener,) = [x for x in config.generic_xds_configs if x.type_url == LISTENER]
    return listener


def test_unknown_node_is_served_once_the_topology_has_it(caplog: pytest.LogCaptureFixture) -> None:
    async def test(cache: SnapshotCache, channel: grpc.aio.Channel) -> None:
        async with running(XdsClient(channel, "late")) as client:
            await client.wait_for(lambda _: "late" in cache.status)
            assert client.history == []
            late = build_snapshots(topology())["edge"]
            cache.set("late", late)
            await client.wait_for(converged(late))

    with caplog.at_level(logging.INFO, "keepsrc.server"):
        with_server(test)
    assert "node late (cluster '') is not in the topology" in caplog.text


def test_fleet_shares_one_entry_and_node_id_wins() -> None:
    """node.id picks a proxy entry, else node.cluster: identical Envoys share one snapshot."""
    async def test(cache: SnapshotCache, channel: grpc.aio.Channel) -> None:
        edge, other = cache.get("edge"), cache.get("other")
        assert edge is not None and other is not None and edge.version_info != other.version_info
        clients = [XdsClient(channel, f"edge-{i}", "edge") for i in range(3)]
        clients.append(XdsClient(channel, "other", "edge"))
        async with running(clients[0]), running(clients[1]), running(clients[2]), running(clients[3]):
            for client in clients[:3]:
                await client.wait_for(converged(edge))
            await clients[3].wait_for(converged(other))
            assert cache.status["edge-0"].key == "edge" and cache.status["other"].key == "other"
        assert cache.resolve("edge-1", "edge") is cache.resolve("edge-2", "edge")
        assert isinstance(cache.resolve("other", "edge"), Entry)

    with_server(test, build_snapshots(topology(extra_proxy=True)))


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_make_before_break_order(delta: bool) -> None:
    """tcp-in moves from cluster a to a new cluster c: c exists before tcp-in uses it, a goes last."""
    async def test(cache: SnapshotCache, channel: grpc.aio.Channel) -> None:
        before = cache.get("edge")
        assert before is not None
        async with running(XdsClient(channel, "edge", delta=delta)) as client:
            await client.wait_for(converged(before))
            mark = len(client.history)
            after = build_snapshots(topology(tcp_service="c"))["edge"]
            cache.set("edge", after)
            await client.wait_for(converged(after))
            pushed = client.history[mark:]
            order = [r.type_url for r in pushed]
            listener_at = order.index(LISTENER)
            first_cluster = pushed[order.index(CLUSTER)]
            # The listener switches to c once c exists, while a still exists; a goes after that.
            assert order.index(CLUSTER) < listener_at
            removal = next(i for i, r in enumerate(pushed) if r.type_url == CLUSTER and (
                "a" in r.removed if delta else "a" not in r.names))
            assert removal > listener_at
            assert "c" in first_cluster.names and "a" not in first_cluster.removed
            assert set(client.held[CLUSTER]) == {"b", "c"}

    with_server(test)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_named_subscription_gets_only_asked_names(delta: bool) -> None:
    async def test(cache: SnapshotCache, channel: grpc.aio.Channel) -> None:
        snapshots = build_snapshots(topology(tcp_service="a"))
        cache.set("edge", snapshots["edge"])
        client = XdsClient(channel, "edge", delta=delta, ads=False, types=(ENDPOINT,), names=("a",))
        async with running(client):
            await client.wait_for(lambda c: set(c.held[ENDPOINT]) == {"a"})
            await client._resubscribe(ENDPOINT, {"a", "b"})
            await client.wait_for(lambda c: set(c.held[ENDPOINT]) == {"a", "b"})
            assert all(set(r.names) <= {"a", "b"} for r in client.history)

    with_server(test)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_per_type_streams_point_eds_and_rds_at_the_per_type_services(delta: bool) -> None:
    async def test(cache: SnapshotCache, channel: grpc.aio.Channel) -> None:
        async with running(XdsClient(channel, "edge", delta=delta, ads=False, types=(CLUSTER,))) as client:
            await client.wait_for(lambda c: "a" in c.held[CLUSTER])
            cluster = client.held[CLUSTER]["a"]
            assert isinstance(cluster, Cluster)
            source = cluster.eds_cluster_config.eds_config.api_config_source
            assert source.grpc_services[0].envoy_grpc.cluster_name == XDS_CLUSTER
            assert source.api_type == (source.DELTA_GRPC if delta else source.GRPC)

    with_server(test)


def test_responses_are_valid_protobuf() -> None:
    """The hand-framed bytes parse as the DiscoveryResponse protobuf itself would build."""
    snapshot = build_snapshots(topology())["edge"]
    entry = Entry("edge", snapshot)
    for type_url in TYPE_ORDER:
        resources = list(snapshot.of_type(type_url).values())
        _, body = entry.sotw_response(type_url, type_url, lambda: resources)  # noqa: B023
        nonce = next_nonce()
        parsed = DiscoveryResponse.FromString(body + text(5, nonce))
        assert (parsed.version_info, parsed.type_url, parsed.nonce) == (snapshot.version(type_url), type_url, nonce)
        assert [a.value for a in parsed.resources] == [r.body for r in resources]
        assert all(a.type_url == type_url for a in parsed.resources)


def test_reload_swaps_good_files_and_keeps_the_last_good_one(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "topology.yaml"
    good = Path("examples/quickstart.yaml").read_text()
    path.write_text(good)

    async def main() -> None:
        cache = SnapshotCache()
        source = TopologySource(cache, path)
        assert source.load()
        first = cache.get("ingress")
        assert first is not None
        stop = asyncio.Event()
        watcher = asyncio.create_task(source.watch(stop, debounce_ms=100))
        try:
            await asyncio.sleep(0.3)  # let the watcher start
            path.write_text(good.replace("127.0.0.1:8080", "127.0.0.1:8081"))
            await _until(lambda: source.loads == 2)
            second = cache.get("ingress")
            assert second is not None
            # Only the endpoints changed, so only their version did.
            assert [t for t in TYPE_ORDER if first.version(t) != second.version(t)] == [ENDPOINT]
            path.write_text(good.replace("protocol: tcp", "protocol: tcpp"))
            await _until(lambda: "keeping the last good snapshots" in caplog.text)
            assert cache.get("ingress") is second
            path.write_text(good)
            await _until(lambda: source.loads == 3)
        finally:
            stop.set()
            await watcher

    with caplog.at_level(logging.INFO, "keepsrc.server"):
        asyncio.run(main())
    line = good.splitlines().index(next(x for x in good.splitlines() if "protocol: tcp" in x)) + 1
    assert f"{path}:{line}:" in caplog.text


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def test_a_fleet_reconnecting_at_once_is_served() -> None:
    """3,500 Envoys of one fleet open their streams in the same instant (as after a restart).
    gRPC's default pending-call limits would refuse hundreds of them."""
    async def test(cache: SnapshotCache, channel: grpc.aio.Channel) -> None:
        snapshot = cache.get("edge")
        assert snapshot is not None
        clients = [XdsClient(channel, f"edge-{i}", "edge", types=(CLUSTER,), keep_history=False)
                   for i in range(3500)]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        try:
            for client, task in zip(clients, tasks, strict=True):
                while client.versions.get(CLUSTER) != snapshot.version(CLUSTER):
                    assert not task.done(), task.exception()
                    await asyncio.sleep(0.05)
        finally:
            for client, task in zip(clients, tasks, strict=True):
                client.cancel()
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    with_server(test, timeout=120)
