"""State-of-the-world xDS: every response carries the full set of one type (or of the asked names)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from keepsrc.server import wire
from keepsrc.server.cache import state_version
from keepsrc.server.stream import WILDCARD_TYPES, Stream, Subscription
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, Resource

_NOTHING: Mapping[str, Resource] = MappingProxyType({})


@dataclass(slots=True)
class _Subscription(Subscription):
    names: frozenset[str] = frozenset()
    sorted_names: tuple[str, ...] = ()  # the names in the order responses list them
    # What the client holds: the resources of the last response (restricted to the names it still
    # asks for). Unknown after a reconnect whose version this server never served.
    held: Mapping[str, Resource] = field(default_factory=lambda: _NOTHING)
    held_known: bool = True


@dataclass(slots=True)
class _Response:
    version: str
    body: bytes
    resources: Mapping[str, Resource]


class SotwStream(Stream):
    __slots__ = ()
    variant_name = "sotw"

    def on_request(self, type_url: str, request: DiscoveryRequest) -> None:
        self.check_names(type_url, len(request.resource_names))
        existing = self.entry.of_type(type_url, self.variant) if self.entry is not None else {}
        names = _shared(frozenset(request.resource_names), existing)
        sub = self.subscriptions.get(type_url)
        if sub is None:
            wildcard = type_url in WILDCARD_TYPES and (not names or "*" in names)
            asked = _shared(names - {"*"}, existing) if "*" in names else names
            sub = self.subscriptions[type_url] = _Subscription(wildcard, names=asked, sorted_names=_sorted(asked))
            if request.version_info:
                self._seed(type_url, sub, request.version_info)
            return
        # A request that answers an older response than the last is ignored: Envoy answers the
        # newer one too, with its current names (xDS spec). Before our first response on this
        # stream nothing is older, whatever nonce a client kept from an earlier server.
        if sub.nonce and request.response_nonce != sub.nonce:
            return
        self.answer(type_url, sub, request)
        if not sub.wildcard and names != sub.names:
            sub.names, sub.sorted_names = names, _sorted(names)
            sub.settled = None
            # Envoy drops what it no longer asks for; asked again, it must be sent again.
            if sub.held_known:
                sub.held = {n: r for n, r in sub.held.items() if n in names}
                sub.version = _state(sub.held) if sub.held else ""
            elif not names:
                sub.held, sub.held_known, sub.version = _NOTHING, True, ""

    def _seed(self, type_url: str, sub: _Subscription, version: str) -> None:
        """A reconnect (to us or a restarted server): the client holds `version`. Content-hash
        versions mean an unchanged type needs nothing; for CDS/LDS, knowing which resources that
        version had keeps the next change make-before-break."""
        sub.version = version
        held = None
        if sub.wildcard and self.entry is not None:
            held = self.cache.held_resources(self.entry, type_url, self.variant, version)
        sub.held, sub.held_known = (held, True) if held is not None else (_NOTHING, False)
        if sub.wildcard:
            sub.diverged = held is None
        elif self.entry is not None:
            sub.diverged = self.plan(type_url, sub, removals=False) is not None
            sub.settled = None
            if not sub.diverged:
                # The version of what it asks for, as served now: it holds exactly those.
                current = self.entry.of_type(type_url, self.variant)
                sub.held, sub.held_known = {n: current[n] for n in sub.sorted_names if n in current}, True
        self.record_held(type_url, version)

    def client_holds(self, type_url: str, sub: _Subscription) -> Mapping[str, Resource] | None:
        return sub.held if sub.held_known else None

    def plan(self, type_url: str, sub: _Subscription, removals: bool,
             in_use: frozenset[str] = frozenset()) -> _Response | None:
        entry = self.entry
        if entry is None or sub.settled is entry:
            return None
        current = entry.of_type(type_url, self.variant)
        every = entry.wildcard_version(type_url, self.variant)
        if sub.wildcard:
            if sub.version == every:
                # Content-hash versions: the client holds exactly this snapshot's resources.
                sub.held, sub.held_known, sub.settled = current, True, entry
                return None
            removed = {n: r for n, r in sub.held.items() if n not in current}
            # Make before break: what is going away stays until the replacements are in place, and
            # then as long as something the client holds still points at it.
            kept = removed if not removals else {n: r for n, r in removed.items() if n in in_use}
            if kept:
                resources: Mapping[str, Resource] = dict(sorted({**current, **kept}.items()))
                key: object = ("kept", type_url, self.variant, frozenset((n, r.version) for n, r in kept.items()))
            else:
                resources, key = current, ("all", type_url, self.variant)
            version, body = entry.sotw_response(type_url, key, lambda: list(resources.values()),
                                                None if kept else every)
            if version == sub.version:
                return None  # only removals are left, and they wait
            return _Response(version, body, resources)
        served = tuple(n for n in sub.sorted_names if n in current)
        if not served:
            # Nothing asked exists (yet), or Envoy unsubscribed all: an empty response would
            # remove nothing in SotW, and before the first one Envoy should wait, not get [].
            sub.settled = entry
            return None
        forced = type_url == ENDPOINT and not self.refresh.isdisjoint(served)
        everything = len(served) == len(current)
        if everything and every == sub.version and not forced:
            sub.settled = entry  # it holds all of the type already: nothing to encode
            return None
        version, body = entry.sotw_response(type_url, ("named", type_url, self.variant, served),
                                            lambda: [current[n] for n in served], every if everything else None)
        if version == sub.version and not forced:
            sub.settled = entry  # SotW never removes a named resource: nothing left to send
            return None
        # Usually every resource of the type is asked for: the client then holds the snapshot's own
        # mapping, not a copy per stream.
        held = current if everything else {n: current[n] for n in served}
        return _Response(version, body, held)

    async def send(self, type_url: str, sub: _Subscription, response: _Response) -> None:
        before, before_known = sub.held, sub.held_known
        sub.nonce, sub.outstanding, sub.version = wire.next_nonce(), True, response.version
        sub.held, sub.held_known, sub.settled = response.resources, True, None
        self.record_sent(type_url, response.version, len(response.body))
        entry = self.entry
        if sub.wildcard and entry is not None and response.resources is not entry.of_type(type_url, self.variant):
            # A make-before-break set: an Envoy that reconnects holding it must be known to.
            self.cache.remember_served(entry.key, type_url, self.variant, response.version, response.resources)
        if type_url == CLUSTER:
            self.clusters_pushed(
                n for n, r in response.resources.items()
                if not before_known or n not in before or before[n].version != r.version
            )
        elif type_url == ENDPOINT:
            self.refresh.difference_update(response.resources)
        await self.context.write(response.body + wire.text(wire.SOTW_NONCE, sub.nonce))

    def still_rejected(self, type_url: str, sub: _Subscription) -> bool:
        # After a NACK, sub.version stays at the rejected version: it is not sent again until the
        # snapshot changes. SotW responses are whole, so the next one replaces whatever part of
        # the rejected one Envoy did apply.
        assert self.status is not None
        nack = self.status.of(type_url).nack
        return nack is not None and nack.version == sub.version


# A fleet's streams ask for the same few name sets (EDS clusters, RDS route configs): each is
# held once for all of them, not once a stream (a frozenset and a tuple, ~300 bytes). Only sets of
# names the snapshot has are shared (junk is the stream's own, freed with it), and the shared
# sets together hold at most MAX_SHARED_NAMES names: what clients send cannot grow this for good.
MAX_SHARED_NAMES = 1_000_000
_name_sets: dict[frozenset[str], tuple[frozenset[str], tuple[str, ...]]] = {}
_shared_names = 0


def _shared(names: frozenset[str], existing: Mapping[str, object]) -> frozenset[str]:
    global _shared_names
    shared = _name_sets.get(names)
    if shared is None:
        if _shared_names + len(names) > MAX_SHARED_NAMES or not all(n in existing for n in names):
            return names
        _shared_names += len(names)
        shared = _name_sets[names] = (names, tuple(sorted(names)))
    return shared[0]


def _sorted(names: frozenset[str]) -> tuple[str, ...]:
    shared = _name_sets.get(names)
    return shared[1] if shared is not None and shared[0] is names else tuple(sorted(names))


def _state(resources: Mapping[str, Resource]) -> str:
    return state_version({n: r.version for n, r in resources.items()})
