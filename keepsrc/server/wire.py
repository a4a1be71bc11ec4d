"""Hand-rolled protobuf framing for discovery responses, so resource bytes are never re-serialized.

A resource's `body` is serialized once per version (snapshots.Resource). A DiscoveryResponse is
only length-delimited fields around those bytes, and protobuf allows fields in any order and
split across concatenated chunks, so a response shared by N streams is encoded once and each
stream appends only its own nonce field.
"""

from __future__ import annotations

import itertools
import os

from keepsrc.snapshots.wire import varint

# Field numbers from envoy/service/discovery/v3/discovery.proto and google/protobuf/any.proto.
ANY_TYPE_URL, ANY_VALUE = 1, 2
SOTW_VERSION_INFO, SOTW_RESOURCES, SOTW_TYPE_URL, SOTW_NONCE = 1, 2, 4, 5
DELTA_SYSTEM_VERSION, DELTA_RESOURCES, DELTA_TYPE_URL, DELTA_NONCE, DELTA_REMOVED = 1, 2, 4, 5, 6
RESOURCE_VERSION, RESOURCE_BODY, RESOURCE_NAME = 1, 2, 3


def field(number: int, data: bytes) -> bytes:
    """One length-delimited field (wire type 2): strings, bytes and embedded messages."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def text(number: int, value: str) -> bytes:
    return field(number, value.encode())


def any_message(type_url: str, body: bytes) -> bytes:
    return text(ANY_TYPE_URL, type_url) + field(ANY_VALUE, body)


def delta_resource(name: str, version: str, type_url: str, body: bytes) -> bytes:
    """A discovery.v3.Resource wrapping one resource, as carried by DeltaDiscoveryResponse."""
    return text(RESOURCE_NAME, name) + text(RESOURCE_VERSION, version) + field(
        RESOURCE_BODY, any_message(type_url, body)
    )


# A random per-process prefix: a restarted server must not hand out a nonce that an Envoy still
# holds from the previous process, or a stale ACK would look current.
_NONCE_PREFIX = os.urandom(4).hex()
_nonces = itertools.count(1)


def next_nonce() -> str:
    return f"{_NONCE_PREFIX}-{next(_nonces):x}"
