"""The hand-written ClusterLoadAssignment bytes equal protobuf's own deterministic serialization."""

from __future__ import annotations

import random

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2

from keepsrc.snapshots import wire
from keepsrc.topology import SocketAddress


def _reference(name: str, endpoints: tuple[SocketAddress, ...]) -> bytes:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": e.host, "port_value": e.port}}}}
            for e in endpoints
        ]}],
    ).SerializeToString(deterministic=True)


CASES = {
    "ipv4": ("web", (SocketAddress("127.0.0.1", 8080), SocketAddress("198.18.4.2", 1))),
    "ipv6": ("v6", (SocketAddress("2001:db8::1", 65535), SocketAddress("::1", 127), SocketAddress("::1", 128))),
    "one-endpoint": ("x", (SocketAddress("10.0.0.1", 80),)),
    "no-endpoints": ("empty", ()),
    # A hostname long enough that the nested lengths need two-byte varints.
    "long-host": ("dns", (SocketAddress("a" * 120 + ".example.internal", 443), SocketAddress("b" * 300, 80))),
    "long-name": ("n" * 200, tuple(SocketAddress(f"10.1.{i // 250}.{i % 250}", 9000 + i) for i in range(300))),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bytes_equal_protobuf(case: str) -> None:
    name, endpoints = CASES[case]
    assert wire.cluster_load_assignment(name, endpoints) == _reference(name, endpoints)


def test_random_endpoints_equal_protobuf() -> None:
    rng = random.Random(1337)
    for _ in range(200):
        endpoints = tuple(
            SocketAddress(rng.choice(["10.0.0.", "fd00::", "host-"]) + str(rng.randrange(1, 10**rng.randrange(1, 40))),
                          rng.randrange(1, 65536))
            for _ in range(rng.randrange(0, 20))
        )
        name = "s" * rng.randrange(1, 300)
        assert wire.cluster_load_assignment(name, endpoints) == _reference(name, endpoints)


def test_varint_matches_protobuf_across_every_length_boundary() -> None:
    from google.protobuf.internal.encoder import _VarintBytes

    from keepsrc.snapshots.wire import varint

    values = [*range(0, 0x4100), *(2**k + d for k in range(7, 64, 7) for d in (-1, 0, 1))]
    assert [varint(v) for v in values] == [_VarintBytes(v) for v in values]
