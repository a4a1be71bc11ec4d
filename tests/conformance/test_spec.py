"""What envoy/api/xds_protocol.rst asks of a management server, played request by request:
wildcard and named subscriptions, resource removal, stale nonces, versions on reconnect and
delta's initial_resource_versions, over ADS and the per-type services."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conformance.raw import CDS, EDS, LDS, RDS, Raw, Response, csds_status, edge, served, status_name

both = pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
transports = pytest.mark.parametrize("per_type", [False, True], ids=["ads", "per-type"])


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


async def subscribe(raw: Raw, type_url: str, names: list[str], *, version: str = "", nonce: str = "") -> None:
    if raw.delta:
        await raw.delta_request(type_url, subscribe=names)
    else:
        await raw.sotw(type_url, names, version=version, nonce=nonce)


# -- wildcard and named ----------------------------------------------------------------------------
@both
@transports
def test_wildcard_cds_gets_everything_and_star_means_wildcard(delta: bool, per_type: bool) -> None:
    async def test() -> None:
        async with served(("edge", edge(extra_listener="extra"))) as (_, channel):
            for names in ([], ["*"]):
                raw = Raw(channel, delta=delta, service=CDS if per_type else None)
                await subscribe(raw, CDS, names)
                assert (await raw.expect(CDS)).names == ["a", "b"]
                raw.close()

    run(test)


@both
@transports
def test_named_subscription_gets_exactly_the_names_that_exist(delta: bool, per_type: bool) -> None:
    async def test() -> None:
        async with served(("edge", edge())) as (_, channel):
            raw = Raw(channel, delta=delta, service=EDS if per_type else None)
            await subscribe(raw, EDS, ["b", "no-such-cluster"])
            first = await raw.expect(EDS)
            assert first.names == ["b"]
            await raw.ack(first, ["b", "no-such-cluster", "a"] if not delta else None)
            if delta:
                await raw.delta_request(EDS, subscribe=["a"])
            response = await raw.expect(EDS)
            # SotW answers with every asked name that exists; delta with what is new to the client.
            assert response.names == (["a"] if delta else ["a", "b"])

    run(test)


@both
def test_nothing_is_sent_for_names_that_do_not_exist(delta: bool) -> None:
    """Before the first response Envoy waits for a resource to appear; an empty SotW response would
    say nothing, so none is sent, until the resource exists."""
    async def test() -> None:
        async with served(("edge", edge())) as (_, channel):
            raw = Raw(channel, delta=delta)
            await subscribe(raw, RDS, ["not-yet"])
            await raw.quiet()
            await subscribe(raw, CDS, [])
            assert (await raw.expect(CDS)).names == ["a", "b"]  # the stream serves on meanwhile

    run(test)


# -- removal -------------------------------------------------------------------------------------
@both
def test_a_removed_wildcard_resource_goes_by_omission_or_by_name(delta: bool) -> None:
    async def test() -> None:
        async with served(("edge", edge(extra_listener="extra"))) as (cache, channel):
            raw = Raw(channel, delta=delta)
            await subscribe(raw, LDS, [])
            listeners = await raw.expect(LDS)
            assert listeners.names == ["extra", "http-in", "tcp-in"]
            await raw.ack(listeners)
            cache.set("edge", edge())
            removal = await raw.expect(LDS)
            if delta:
                assert (removal.names, removal.removed) == ([], ["extra"])
            else:
                assert removal.names == ["http-in", "tcp-in"]

    run(test)


@both
def test_a_cluster_goes_once_nothing_the_client_holds_points_at_it(delta: bool) -> None:
    """http-in and its cluster b leave the topology. b is removed only once nothing the client holds
    points at it: not while the client still holds http-in's route config (Envoy keeps it while the
    listener drains), and in SotW, where a named resource cannot be removed, once the client stops
    asking for it."""
    async def test() -> None:
        async with served(("edge", edge())) as (cache, channel):
            raw = Raw(channel, delta=delta)
            responses: dict[str, Response] = {}
            for type_url, names in ((CDS, []), (EDS, ["a", "b"]), (LDS, []), (RDS, ["http-in"])):
                await subscribe(raw, type_url, names)
                responses[type_url] = await raw.expect(type_url)
                await raw.ack(responses[type_url])
            cache.set("edge", edge(http=False))  # http-in, its route and cluster b are gone
            seen: list[Response] = []
            while not any(r.type_url == LDS for r in seen):
                seen.append(await raw.recv())
                await raw.ack(seen[-1], None if delta or seen[-1].type_url != EDS else ["a", "b"])
            listeners = seen[-1]
            assert "http-in" in listeners.removed if delta else listeners.names == ["tcp-in"]
            if delta:
                # The route config goes (no listener names it now), then b, then b's endpoints.
                routes = await raw.expect(RDS)
                assert routes.removed == ["http-in"]
                await raw.ack(routes)
                assert (await raw.expect(CDS)).removed == ["b"]
            else:
                # The client still holds route http-in, which points at b: b stays.
                await raw.quiet()
                # The drained listener's route subscription goes to zero names: now b goes.
                await raw.sotw(RDS, [], version=responses[RDS].version, nonce=responses[RDS].nonce)
                clusters = await raw.expect(CDS)
                assert clusters.names == ["a"]

    run(test)


# -- nonces --------------------------------------------------------------------------------------
def test_sotw_request_with_a_stale_nonce_is_ignored() -> None:
    """A request answering an older response than the last is ignored: Envoy answers the newer one
    too, with its current names (xds_protocol.rst, 'nonce')."""
    async def test() -> None:
        async with served(("edge", edge())) as (cache, channel):
            raw = Raw(channel)
            await raw.sotw(EDS, ["a"])
            old = await raw.expect(EDS)
            await raw.ack(old)
            cache.set("edge", edge(a_port=9100))
            new = await raw.expect(EDS)
            # The client changes its names in a request that still carries the old nonce...
            await raw.sotw(EDS, ["a", "b"], version=old.version, nonce=old.nonce)
            await raw.quiet()
            # ...and the ACK of the new response, with those names, is what counts.
            await raw.sotw(EDS, ["a", "b"], version=new.version, nonce=new.nonce)
            assert (await raw.expect(EDS)).names == ["a", "b"]

    run(test)


def test_a_nonce_from_an_earlier_server_does_not_hide_a_subscription_change() -> None:
    """After a server restart the client's requests carry nonces of the old server; until this
    server has sent anything, no request can be stale."""
    async def test() -> None:
        async with served(("edge", edge())) as (_, channel):
            raw = Raw(channel)
            await raw.sotw(EDS, ["no-such"], nonce="from-the-old-server")
            await raw.sotw(EDS, ["a"], nonce="from-the-old-server")
            assert (await raw.expect(EDS)).names == ["a"]

    run(test)


@both
def test_an_ack_with_an_unknown_nonce_is_not_taken_for_an_ack(delta: bool) -> None:
    async def test() -> None:
        async with served(("edge", edge())) as (_, channel):
            raw = Raw(channel, delta=delta)
            await subscribe(raw, CDS, [])
            clusters = await raw.expect(CDS)
            if delta:
                await raw.delta_request(CDS, nonce="made-up")
            else:
                await raw.sotw(CDS, version=clusters.version, nonce="made-up")
            await asyncio.sleep(0.1)
            status = await csds_status(channel, "edge")
            assert status_name(status[CDS]) == "STALE"
            await raw.ack(clusters)
            for _ in range(50):
                if status_name((await csds_status(channel, "edge"))[CDS]) == "SYNCED":
                    break
                await asyncio.sleep(0.02)
            assert status_name((await csds_status(channel, "edge"))[CDS]) == "SYNCED"

    run(test)


# -- versions on reconnect -----------------------------------------------------------------------
@transports
def test_sotw_reconnect_with_the_current_version_gets_nothing(per_type: bool) -> None:
    async def test() -> None:
        snapshot = edge()
        async with served(("edge", snapshot)) as (cache, channel):
            raw = Raw(channel, service=CDS if per_type else None)
            await raw.sotw(CDS)
            clusters = await raw.expect(CDS)
            raw.close()
            again = Raw(channel, service=CDS if per_type else None)
            await again.sotw(CDS, version=clusters.version)
            # Probe: the next change must be the first thing on the stream.
            cache.set("edge", edge(a_timeout_ms=2000))
            assert (await again.expect(CDS)).version != clusters.version

    run(test)


def test_delta_initial_resource_versions_send_only_the_difference() -> None:
    async def test() -> None:
        snapshot = edge(extra_listener="extra")
        listeners = {n: r.version for n, r in snapshot.of_type(LDS).items()}
        async with served(("edge", snapshot)) as (_, channel):
            raw = Raw(channel, delta=True)
            held = {**listeners, "tcp-in": "outdated", "gone": "0123456789abcdef"}
            del held["extra"]
            await raw.delta_request(LDS, initial=held)
            response = await raw.expect(LDS)
            # tcp-in is outdated and extra missing: sent; http-in is current: not sent.
            assert response.resource_versions == {"extra": listeners["extra"], "tcp-in": listeners["tcp-in"]}
            await raw.ack(response)
            # "gone" does not exist: removed once the update is answered.
            assert (await raw.expect(LDS)).removed == ["gone"]

    run(test)


def test_per_type_stream_refuses_a_first_request_without_a_node() -> None:
    async def test() -> None:
        async with served(("edge", edge())) as (_, channel):
            raw = Raw(channel, node="", service=CDS)
            await raw.sotw(CDS)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await raw.recv()
            assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    run(test)


def test_an_empty_server_says_not_serving_and_refuses_streams_until_loaded() -> None:
    """A fresh replica must never hand an Envoy an empty config."""
    async def test() -> None:
        async with served() as (cache, channel):
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            raw = Raw(channel)
            await raw.sotw(CDS)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await raw.recv()
            assert error.value.code() is grpc.StatusCode.UNAVAILABLE
            cache.set_all({"edge": edge()})
            for _ in range(50):
                if (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.02)
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
            again = Raw(channel)
            await again.sotw(CDS)
            assert (await again.expect(CDS)).names == ["a", "b"]

    run(test)
