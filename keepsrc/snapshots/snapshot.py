"""A per-node Snapshot: typed resources by type URL, each serialized once and versioned by content.

Versions are a hash of the deterministic wire bytes, so two keepsrc replicas (or a restarted
server) given the same topology hand out the same versions and an Envoy sees nothing new.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

from google.protobuf.message import Message

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

# Make-before-break order for pushing a change: clusters, then their endpoints, then the
# listeners that use them, then routes. Removals go after the adds that replace them.
TYPE_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
SHORT_NAMES = {CLUSTER: "cluster", ENDPOINT: "endpoint", LISTENER: "listener", ROUTE: "route"}


References = frozenset[tuple[str, str]]


def content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


EMPTY_VERSION = content_version(b"")  # of a type with no resources


class Resource:
    """One xDS resource: wire bytes (serialized once), content version, and its typed message.

    Streams only ever need `body`; `message` is kept when the builder made one, and otherwise
    parsed from `body` on first use (render, tests, debugging).
    """

    __slots__ = ("_message", "body", "message_type", "name", "references", "type_url", "version")

    def __init__(self, name: str, type_url: str, body: bytes, message_type: type[Message],
                 message: Message | None = None, references: References | None = None) -> None:
        self.name = name
        self.type_url = type_url
        self.body = body
        self.version = content_version(body)
        self.message_type = message_type
        self._message = message
        # (type URL, name) of each resource this one points at: a listener's route config and
        # clusters, a route's clusters, an EDS cluster's endpoints. The server removes nothing an
        # Envoy's resources still point at. None: not known (a resource not made by the builder).
        self.references = references

    @classmethod
    def of(cls, name: str, type_url: str, message: Message, references: References | None = None) -> Resource:
        return cls(name, type_url, message.SerializeToString(deterministic=True), type(message), message, references)

    @property
    def message(self) -> Message:
        if self._message is None:
            self._message = self.message_type.FromString(self.body)
        return self._message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Resource) and (self.type_url, self.name, self.body) == (
            other.type_url, other.name, other.body)

    def __hash__(self) -> int:
        return hash((self.type_url, self.name, self.version))

    def __repr__(self) -> str:
        return f"Resource({SHORT_NAMES.get(self.type_url, self.type_url)} {self.name!r} v{self.version})"


@dataclass(frozen=True)
class Snapshot:
    """Everything one proxy entry (and every Envoy that maps to it) is served.

    `identities`: SPIFFE IDs besides the entry's own that may be served it, when the server
    authorizes clients by certificate (not part of any version: they decide who gets the
    resources, not what the resources are)."""

    resources: Mapping[str, Mapping[str, Resource]] = field(default_factory=dict)
    identities: frozenset[str] = frozenset()

    @classmethod
    def from_resources(cls, resources: Iterable[Resource], identities: Iterable[str] = ()) -> Snapshot:
        by_type: dict[str, dict[str, Resource]] = {t: {} for t in TYPE_ORDER}
        for resource in resources:
            by_type.setdefault(resource.type_url, {})[resource.name] = resource
        return cls(MappingProxyType({t: MappingProxyType(dict(sorted(r.items()))) for t, r in by_type.items()}),
                   frozenset(identities))

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources.get(type_url, MappingProxyType({}))

    @cached_property
    def versions(self) -> Mapping[str, str]:
        """The SotW version of each type: a hash over its resources' names and versions, by name."""
        return {
            type_url: content_version("\n".join(f"{n}={r.version}" for n, r in sorted(resources.items())).encode())
            for type_url, resources in self.resources.items()
        }

    @cached_property
    def size(self) -> int:
        """Bytes of every resource's body."""
        return sum(len(r.body) for resources in self.resources.values() for r in resources.values())

    def version(self, type_url: str) -> str:
        return self.versions.get(type_url, EMPTY_VERSION)

    @cached_property
    def version_info(self) -> str:
        """One version for the whole snapshot, for logs and `keepsrc status`."""
        return content_version(" ".join(self.version(t) for t in sorted(self.resources)).encode())
