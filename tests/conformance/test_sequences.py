"""The sequences real fleets produce, played request by request against the server, SotW and delta.

Each test is one of the failures issue 10 reproduced against real Envoy 1.40 (their real-Envoy
counterparts are in tests/test_xds_sequences_envoy.py); docs/xds.md names the guarantee each proves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest

from keepsrc.server import sotw
from keepsrc.server.stream import MAX_SUBSCRIBED_NAMES
from tests.conformance.raw import CDS, EDS, LDS, RDS, Raw, Response, csds_status, edge, served, status_name

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
RUNTIME = "type.googleapis.com/envoy.service.runtime.v3.Runtime"

both = pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])


def run(test: Callable[[], Awaitable[None]], timeout: float = 30) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout))


class Fleet:
    """An Envoy-like driver over Raw that keeps what it holds, so tests read like the sequences."""

    def __init__(self, raw: Raw, delta: bool) -> None:
        self.raw = raw
        self.delta = delta
        self.last: dict[str, Response] = {}  # type -> last response received
        self.versions: dict[str, str] = {}  # SotW: type -> version accepted
        self.names: dict[str, list[str]] = {}  # SotW: type -> names asked
        self.resource_versions: dict[str, dict[str, str]] = {}  # delta: type -> name -> version held
        self.passed: list[Response] = []  # responses ACKed while waiting for another type

    async def subscribe(self, type_url: str, names: list[str] | None = None) -> None:
        if self.delta:
            await self.raw.delta_request(type_url, subscribe=names or [])
        else:
            self.names[type_url] = names or []
            await self.raw.sotw(type_url, names or [], version=self.versions.get(type_url, ""),
                                nonce=self.last[type_url].nonce if type_url in self.last else "")

    async def receive(self, type_url: str) -> Response:
        """The next response of `type_url`; one of another type in between is ACKed, as Envoy does."""
        while True:
            response = await self.raw.recv()
            self.last[response.type_url] = response
            if response.type_url == type_url:
                return response
            self.passed.append(response)
            await self.ack(response)

    async def ack(self, response: Response, names: list[str] | None = None) -> None:
        if self.delta:
            held = self.resource_versions.setdefault(response.type_url, {})
            held.update(response.resource_versions)
            for name in response.removed:
                held.pop(name, None)
        else:
            self.versions[response.type_url] = response.version
            if names is not None:
                self.names[response.type_url] = names
            names = self.names.get(response.type_url, [])
        await self.raw.ack(response, names)

    async def nack(self, response: Response, message: str = "rejected") -> None:
        await self.raw.nack(response, message, held_version=self.versions.get(response.type_url, ""),
                            names=self.names.get(response.type_url, []))

    async def configure(self) -> dict[str, Response]:
        """Envoy's start: CDS, then EDS for its clusters, LDS, then RDS for its listeners."""
        await self.subscribe(CDS)
        await self.ack(clusters := await self.receive(CDS))
        await self.subscribe(EDS, sorted(clusters.names))
        await self.ack(await self.receive(EDS))
        await self.subscribe(LDS)
        await self.ack(await self.receive(LDS))
        await self.subscribe(RDS, ["http-in"])
        await self.ack(await self.receive(RDS))
        return dict(self.last)


async def statuses(channel: grpc.aio.Channel, node: str = "edge") -> dict[str, str]:
    return {t.rsplit(".", 1)[-1]: status_name(c) for t, c in (await csds_status(channel, node)).items()}


async def until_status(channel: grpc.aio.Channel, expected: dict[str, str], node: str = "edge") -> None:
    """CSDS is read after the server processed our last request, which it does asynchronously."""
    for _ in range(100):
        if await statuses(channel, node) == expected:
            return
        await asyncio.sleep(0.02)
    assert await statuses(channel, node) == expected


ALL_SYNCED = {"Cluster": "SYNCED", "ClusterLoadAssignment": "SYNCED", "Listener": "SYNCED",
              "RouteConfiguration": "SYNCED"}


# -- 1. a cluster edit is followed by its endpoints --------------------------------------------------
@both
def test_cluster_edit_is_followed_by_its_endpoints(delta: bool) -> None:
    """Envoy re-warms a modified EDS cluster until a ClusterLoadAssignment response arrives, even an
    unchanged one: after CDS carries a cluster, EDS for it follows."""
    async def test() -> None:
        async with served(("edge", edge())) as (cache, channel):
            fleet = Fleet(Raw(channel, delta=delta), delta)
            before = await fleet.configure()
            cache.set("edge", edge(a_timeout_ms=2500))  # the cluster changes, its endpoints do not
            clusters = await fleet.receive(CDS)
            assert clusters.names == (["a"] if delta else ["a", "b"])
            endpoints = await fleet.receive(EDS)
            if delta:
                assert endpoints.names == ["a"]
                assert endpoints.resource_versions == {"a": before[EDS].resource_versions["a"]}
            else:
                assert (endpoints.names, endpoints.version) == (["a", "b"], before[EDS].version)
            await fleet.ack(clusters)
            await fleet.ack(endpoints)
            await until_status(channel, ALL_SYNCED)

    run(test)


@both
def test_reconnect_to_a_moved_on_topology_gets_endpoints_of_changed_clusters(delta: bool) -> None:
    async def test() -> None:
        async with served(("edge", edge())) as (cache, channel):
            first = Fleet(Raw(channel, delta=delta), delta)
            await first.configure()
            first.raw.close()
            cache.set("edge", edge(a_timeout_ms=2500))
            # The Envoy reconnects reporting what it holds.
            raw = Raw(channel, delta=delta)
            if delta:
                await raw.delta_request(CDS, initial=first.resource_versions[CDS])
                await raw.delta_request(EDS, subscribe=["a", "b"], initial=first.resource_versions[EDS])
            else:
                await raw.sotw(CDS, version=first.versions[CDS])
                await raw.sotw(EDS, ["a", "b"], version=first.versions[EDS])
            clusters = await raw.expect(CDS)
            endpoints = await raw.expect(EDS)
            assert clusters.names == (["a"] if delta else ["a", "b"])
            assert "a" in endpoints.names

    run(test)


# -- 2. a named subscription that drops to zero names and comes back --------------------------------
@both
def test_listener_removed_then_restored_gets_its_route_again(delta: bool) -> None:
    async def test() -> None:
        async with served(("edge", edge())) as (cache, channel):
            fleet = Fleet(Raw(channel, delta=delta), delta)
            first = await fleet.configure()
            cache.set("edge", edge(http=False))
            listeners = await fleet.receive(LDS)
            assert "http-in" not in listeners.names or "http-in" in listeners.removed
            await fleet.ack(listeners)
            # The listener drained: Envoy drops its RDS subscription, to zero names.
            if delta:
                await fleet.raw.delta_request(RDS, unsubscribe=["http-in"])
            else:
                fleet.names[RDS] = []
                await fleet.raw.sotw(RDS, [], version=fleet.versions[RDS], nonce=first[RDS].nonce)
            cache.set("edge", edge())  # the same listener and route, back
            listeners = await fleet.receive(LDS)
            assert "http-in" in listeners.names
            await fleet.ack(listeners)
            await fleet.subscribe(RDS, ["http-in"])
            routes = await fleet.receive(RDS)
            assert routes.names == ["http-in"]
            await fleet.ack(routes)
            await until_status(channel, ALL_SYNCED)

    run(test)


# -- 3. delta: a NACK of a response of several resources --------------------------------------------
def test_delta_partial_nack_probes_each_resource_and_a_revert_resends_what_was_applied() -> None:
    async def test() -> None:
        s0 = edge()
        async with served(("edge", s0)) as (cache, channel):
            fleet = Fleet(Raw(channel, delta=True), True)
            await fleet.configure()
            cache.set("edge", edge(xff_hops=1, tcp_service="c"))  # both listeners change
            await fleet.ack(await fleet.receive(CDS))
            await fleet.subscribe(EDS, ["c"])
            await fleet.ack(await fleet.receive(EDS))
            both_listeners = await fleet.receive(LDS)
            assert both_listeners.names == ["http-in", "tcp-in"]
            await fleet.nack(both_listeners, "tcp-in: cluster_specifier is required")
            # Envoy applied http-in and refused tcp-in, and its message does not say so reliably:
            # each is sent alone.
            alone = await fleet.receive(LDS)
            assert alone.names == ["http-in"]
            assert (await statuses(channel))["Listener"] == "ERROR"
            await fleet.ack(alone)
            alone = await fleet.receive(LDS)
            assert alone.names == ["tcp-in"]
            await fleet.nack(alone, "tcp-in: cluster_specifier is required")
            # The clusters: a (which the old tcp-in still uses) is not removed while the NACK
            # stands, and the status says a newer version waits.
            await until_status(channel, {"Cluster": "STALE", "ClusterLoadAssignment": "STALE", "Listener": "ERROR",
                                         "RouteConfiguration": "SYNCED"})
            # Revert: the applied http-in is sent back; tcp-in is already what the client holds.
            cache.set("edge", s0)
            listeners = await fleet.receive(LDS)
            assert listeners.resource_versions == {"http-in": s0.of_type(LDS)["http-in"].version}
            await fleet.ack(listeners)
            clusters = await fleet.receive(CDS)
            assert clusters.removed == ["c"]
            await fleet.ack(clusters)
            endpoints = await fleet.receive(EDS)
            assert endpoints.removed == ["c"]
            await fleet.ack(endpoints)
            await until_status(channel, ALL_SYNCED)

    run(test)


# -- 4. one response in flight per type ---------------------------------------------------------
@both
def test_a_nack_is_never_lost_behind_a_later_response(delta: bool) -> None:
    """The next response of a type waits for the answer to the last: NACK of N1 then ACK of N2 can
    not happen, and the status never says SYNCED for what the client refused."""
    async def test() -> None:
        async with served(("edge", edge())) as (cache, channel):
            fleet = Fleet(Raw(channel, delta=delta), delta)
            await fleet.configure()
            first = edge(xff_hops=1)
            cache.set("edge", first)
            refused = await fleet.receive(LDS)
            assert (await statuses(channel))["Listener"] == "STALE"
            second = edge(xff_hops=1, extra_listener="extra")
            cache.set("edge", second)
            await fleet.raw.quiet()  # the second waits for the first's answer
            assert (await statuses(channel))["Listener"] == "STALE"
            await fleet.nack(refused, "http-in refused")
            await until_status(channel, {**ALL_SYNCED, "Listener": "ERROR"})
            listeners = await fleet.receive(LDS)
            if delta:
                assert listeners.names == ["extra"]  # the refused http-in is not sent again
            else:
                assert listeners.names == ["extra", "http-in", "tcp-in"]
            await fleet.ack(listeners)
            # Delta: http-in is still the refused version; SotW: the client took the whole state.
            await until_status(channel, {**ALL_SYNCED, "Listener": "ERROR" if delta else "SYNCED"})

    run(test)


# -- 5. reconnect ------------------------------------------------------------------------------------
@both
def test_reconnect_is_synced_and_keeps_make_before_break(delta: bool) -> None:
    async def test() -> None:
        async with served(("edge", edge())) as (cache, channel):
            first = Fleet(Raw(channel, delta=delta), delta)
            held = await first.configure()
            first.raw.close()
            raw = Raw(channel, delta=delta)
            fleet = Fleet(raw, delta)
            if delta:
                fleet.resource_versions = first.resource_versions
                for type_url, names in ((CDS, []), (EDS, ["a", "b"]), (LDS, []), (RDS, ["http-in"])):
                    await raw.delta_request(type_url, subscribe=names, initial=first.resource_versions[type_url])
            else:
                fleet.versions, fleet.names = first.versions, first.names
                for type_url in (CDS, EDS, LDS, RDS):
                    await raw.sotw(type_url, held[type_url].names if type_url in (EDS, RDS) else [],
                                   version=first.versions[type_url])
            await until_status(channel, ALL_SYNCED)
            # tcp-in moves from cluster a to a new cluster c.
            cache.set("edge", edge(tcp_service="c"))
            clusters = await fleet.receive(CDS)  # the first response of the new stream: nothing was resent
            if delta:
                assert (clusters.names, clusters.removed) == (["c"], [])
            else:
                assert clusters.names == ["a", "b", "c"]  # a stays until tcp-in stops using it
            await fleet.ack(clusters)
            await fleet.subscribe(EDS, ["c"] if delta else ["a", "b", "c"])
            await fleet.ack(await fleet.receive(EDS))
            listeners = await fleet.receive(LDS)
            await fleet.ack(listeners)
            clusters = await fleet.receive(CDS)
            if delta:
                assert clusters.removed == ["a"]
            else:
                assert clusters.names == ["b", "c"]
            await fleet.ack(clusters)

    run(test)


# -- 6. types keepsrc does not serve -------------------------------------------------------------
@both
def test_unknown_types_on_ads_are_ignored_and_the_stream_goes_on(delta: bool) -> None:
    async def test() -> None:
        async with served(("edge", edge())) as (_, channel):
            raw = Raw(channel, delta=delta)
            for type_url in (SECRET, RUNTIME, "junk"):
                if delta:
                    await raw.delta_request(type_url, subscribe=["server-cert"])
                else:
                    await raw.sotw(type_url, ["server-cert"])
            if delta:
                await raw.delta_request(CDS)
            else:
                await raw.sotw(CDS)
            assert (await raw.expect(CDS)).names == ["a", "b"]

    run(test)


@both
def test_per_type_service_fills_in_an_empty_type_and_refuses_another(delta: bool) -> None:
    async def test() -> None:
        async with served(("edge", edge())) as (_, channel):
            raw = Raw(channel, delta=delta, service=CDS)
            if delta:
                await raw.delta_request("")
            else:
                await raw.sotw("")
            assert (await raw.expect(CDS)).names == ["a", "b"]
            wrong = Raw(channel, delta=delta, service=CDS)
            if delta:
                await wrong.delta_request(LDS)
            else:
                await wrong.sotw(LDS)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await wrong.recv()
            assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    run(test)


# -- 7. what a client sends does not grow the server ------------------------------------------------
@both
def test_junk_subscriptions_share_the_served_encodings_and_are_bounded(delta: bool) -> None:
    async def test() -> None:
        snapshot = edge()
        async with served(("edge", snapshot)) as (cache, channel):
            for round_ in range(40):
                raw = Raw(channel, delta=delta, node=f"edge-{round_}", cluster="edge")
                junk = [f"junk-{round_}-{i}" for i in range(500)]
                if delta:
                    await raw.delta_request(EDS, subscribe=["a", *junk])
                else:
                    await raw.sotw(EDS, ["a", *junk])
                assert (await raw.expect(EDS)).names == ["a"]
                raw.close()
            entry = cache.resolve("edge", "edge")
            assert entry is not None
            # One encoding served all 40 clients: keyed by what was served, not by what was asked.
            keys = list(entry._encodings._items)
            assert len(keys) == 1
            assert "junk" not in repr(keys)
            # Name sets shared across a fleet's streams hold only names that exist.
            assert not any(name.startswith("junk") for names in sotw._name_sets for name in names)

    run(test)


@both
def test_a_subscription_over_the_name_limit_is_refused(delta: bool) -> None:
    async def test() -> None:
        async with served(("edge", edge())) as (_, channel):
            raw = Raw(channel, delta=delta)
            names = [f"n{i}" for i in range(MAX_SUBSCRIBED_NAMES + 1)]
            if delta:
                # Increments: each request is fine, the sum is not.
                half = len(names) // 2
                await raw.delta_request(EDS, subscribe=names[:half])
                await raw.delta_request(EDS, subscribe=names[half:])
            else:
                await raw.sotw(EDS, names)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await raw.recv(20)
            assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

    run(test, timeout=60)


