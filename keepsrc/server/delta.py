"""Incremental (delta) xDS: per-resource versions, only what changed, removals by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest

from keepsrc.server import wire
from keepsrc.server.cache import state_version
from keepsrc.server.stream import WILDCARD_TYPES, Stream, Subscription
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, Resource

# The version recorded for a resource the client may or may not have applied: it was in a
# response of several that the client NACKed (Envoy applies the valid resources of a delta
# response and rejects the rest, without saying which in a form to rely on). It equals no real
# version. Such resources are probed: sent again one per response, so each answer is exact.
UNKNOWN = ""


@dataclass(slots=True)
class _Subscription(Subscription):
    names: set[str] = field(default_factory=set)
    # name -> version the client holds, as far as we know: seeded from initial_resource_versions
    # on a reconnect, then what each response carried (UNKNOWN for what a NACKed one carried).
    known: dict[str, str] = field(default_factory=dict)
    # The response in flight: name -> the version the client held before it (None: none).
    in_flight: dict[str, str | None] = field(default_factory=dict)
    # name -> version the client rejected: not sent again until that resource changes.
    rejected: dict[str, str] = field(default_factory=dict)
    # name -> (version to probe, version held before the NACKed response): resources of a NACKed
    # response of several, each to be sent alone to learn whether the client took it.
    probes: dict[str, tuple[str, str | None]] = field(default_factory=dict)


@dataclass(slots=True)
class _Response:
    adds: tuple[Resource, ...]
    removed: tuple[str, ...]


class DeltaStream(Stream):
    __slots__ = ()
    variant_name = "delta"

    def on_request(self, type_url: str, request: DeltaDiscoveryRequest) -> None:
        subscribe = request.resource_names_subscribe
        sub = self.subscriptions.get(type_url)
        if sub is None:
            sub = self.subscriptions[type_url] = _Subscription(
                wildcard=type_url in WILDCARD_TYPES and (not subscribe or "*" in subscribe)
            )
            if request.initial_resource_versions:
                self.check_names(type_url, len(request.initial_resource_versions))
                sub.known = dict(request.initial_resource_versions)
                sub.version = state_version(sub.known)
                if self.entry is not None:
                    current = self.entry.of_type(type_url, self.variant)
                    sub.diverged = any(
                        (resource := current.get(name)) is None or resource.version != version
                        for name, version in sub.known.items())
                self.record_held(type_url, sub.version)
        else:
            self.answer(type_url, sub, request)
        # Unlike SotW, subscription changes are increments that must never be dropped, even on a
        # request that answers an older response.
        if subscribe or request.resource_names_unsubscribe:
            sub.settled = None
        for name in subscribe:
            if name == "*":
                sub.wildcard = True
            else:
                sub.names.add(name)
        for name in request.resource_names_unsubscribe:
            if name == "*":
                sub.wildcard = False
            else:
                sub.names.discard(name)
                if sub.known.pop(name, None) is not None:
                    sub.version = state_version(sub.known)
                sub.rejected.pop(name, None)
                sub.probes.pop(name, None)
        self.check_names(type_url, len(sub.names))

    def client_holds(self, type_url: str, sub: _Subscription) -> Mapping[str, Resource] | None:
        if self.entry is None:
            return None
        held = {}
        for name, version in sub.known.items():
            resource = self.cache.resource_at(self.entry, type_url, self.variant, name, version)
            if resource is None:
                return None  # a version this server never served, or UNKNOWN after a NACK
            held[name] = resource
        return held

    def plan(self, type_url: str, sub: _Subscription, removals: bool,
             in_use: frozenset[str] = frozenset()) -> _Response | None:
        entry = self.entry
        if entry is None or sub.settled is entry:
            return None
        current = entry.of_type(type_url, self.variant)
        probe = self._next_probe(sub, current)
        if probe is not None:
            return _Response((probe,), ())
        if sub.wildcard and sub.version == entry.wildcard_version(type_url, self.variant):
            sub.settled = entry  # the client holds exactly this snapshot's resources
            return None
        wanted = current.values() if sub.wildcard else [current[n] for n in sorted(sub.names) if n in current]
        known, rejected = sub.known, sub.rejected
        refresh = self.refresh if type_url == ENDPOINT else ()
        adds = tuple(
            r for r in wanted
            if (known.get(r.name) != r.version and rejected.get(r.name) != r.version) or r.name in refresh
        )
        gone = tuple(n for n in known if n not in current)
        removed = tuple(n for n in gone if n not in in_use) if removals else ()
        if not adds and not removed:
            if not gone:
                sub.settled = entry
            return None
        return _Response(adds, removed)

    @staticmethod
    def _next_probe(sub: _Subscription, current: Mapping[str, Resource]) -> Resource | None:
        """The next resource to probe; a probe the snapshot moved past is dropped (its new
        version differs from UNKNOWN, so the ordinary path sends it)."""
        while sub.probes:
            name, (version, _) = next(iter(sub.probes.items()))
            resource = current.get(name)
            if resource is not None and resource.version == version and name in sub.known:
                return resource
            del sub.probes[name]
        return None

    async def send(self, type_url: str, sub: _Subscription, response: _Response) -> None:
        assert self.entry is not None
        in_flight: dict[str, str | None] = {}
        for resource in response.adds:
            name = resource.name
            probe = sub.probes.pop(name, None)
            in_flight[name] = probe[1] if probe is not None else sub.known.get(name)
            sub.known[name] = resource.version
            sub.rejected.pop(name, None)
        for name in response.removed:
            del sub.known[name]
        sub.in_flight = in_flight
        sub.nonce, sub.outstanding, sub.version = wire.next_nonce(), True, state_version(sub.known)
        sub.settled = None
        body = b"".join([
            self.entry.delta_resources(type_url, self.variant, response.adds),
            *(wire.text(wire.DELTA_REMOVED, n) for n in response.removed),
            wire.text(wire.DELTA_SYSTEM_VERSION, sub.version),
            wire.text(wire.DELTA_NONCE, sub.nonce),
        ])
        self.record_sent(type_url, sub.version, len(body))
        if type_url == CLUSTER:
            self.clusters_pushed(in_flight)
        elif type_url == ENDPOINT:
            self.refresh.difference_update(in_flight)
        await self.context.write(body)

    def rejected(self, type_url: str, sub: _Subscription) -> None:
        """A NACK of one resource: the client keeps what it held before, and the refused version
        is not sent again until it changes. Of several: each is probed alone (see UNKNOWN)."""
        single = len(sub.in_flight) == 1
        for name, before in sub.in_flight.items():
            version = sub.known.get(name)
            if version is None:
                continue  # unsubscribed since
            if single:
                sub.rejected[name] = version
                if before is None:
                    del sub.known[name]
                else:
                    sub.known[name] = before
            else:
                sub.probes[name] = (version, before)
                sub.known[name] = UNKNOWN
        sub.in_flight = {}
        sub.version = state_version(sub.known)
        sub.settled = None

    def accepted(self, type_url: str, sub: _Subscription) -> None:
        sub.in_flight = {}

    def still_rejected(self, type_url: str, sub: _Subscription) -> bool:
        if sub.probes:
            return True  # a resource of the NACKed response is still unaccounted for
        if not sub.rejected:
            return False
        # A rejection stands while the snapshot still holds the version that was refused.
        current = self.entry.of_type(type_url, self.variant) if self.entry is not None else {}
        for name, version in list(sub.rejected.items()):
            resource = current.get(name)
            if resource is None or resource.version != version:
                del sub.rejected[name]
        return bool(sub.rejected)
