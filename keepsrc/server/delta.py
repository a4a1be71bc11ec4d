"""Incremental (delta) xDS: per-resource versions, only what changed, removals by name."""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest

from keepsrc.server import wire
from keepsrc.server.cache import state_version
from keepsrc.server.stream import WILDCARD_TYPES, Stream


@dataclass(slots=True)
class _Subscription:
    wildcard: bool
    names: set[str] = field(default_factory=set)
    # name -> version Envoy holds, as far as we know: seeded from initial_resource_versions on a
    # reconnect, then what it ACKed (optimistically: what we sent, undone by a NACK).
    known: dict[str, str] = field(default_factory=dict)
    # The last response's adds: name -> the version known before it (None: new), to undo on a NACK.
    in_flight: dict[str, str | None] = field(default_factory=dict)
    # name -> version the client rejected: not sent again until something of this type changes.
    rejected: dict[str, str] = field(default_factory=dict)
    nonce: str = ""
    outstanding: bool = False
    version: str = ""  # state_version(known) after the last response, for status and logs


class DeltaStream(Stream):
    __slots__ = ()
    variant_name = "delta"

    async def on_request(self, request: DeltaDiscoveryRequest) -> None:
        type_url = request.type_url
        subscribe = list(request.resource_names_subscribe)
        sub = self.subscriptions.get(type_url)
        if sub is None:
            sub = self.subscriptions[type_url] = _Subscription(
                wildcard=type_url in WILDCARD_TYPES and (not subscribe or "*" in subscribe)
            )
            if request.initial_resource_versions:
                sub.known = dict(request.initial_resource_versions)
                sub.version = state_version(sub.known)
                self.record_ack(type_url, sub.version)
        elif request.response_nonce and request.response_nonce == sub.nonce:
            sub.outstanding = False
            if request.HasField("error_detail"):
                self.record_nack(type_url, sub.version, request.error_detail)
                _undo_rejected(sub)
            else:
                self.record_ack(type_url, sub.version)
            sub.in_flight = {}
        # Unlike SotW, subscription changes are increments that must never be dropped, even on a
        # request that answers an older response.
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
                sub.known.pop(name, None)
        await self.respond(type_url, sub, send_removals=not self.removals_pending)
        await self.finish_removals()

    async def respond(self, type_url: str, sub: _Subscription, send_removals: bool) -> bool:
        """Send what changed for this type; True if removals were held back for later."""
        if self.entry is None:
            return False
        current = self.entry.of_type(type_url, self.variant)
        wanted = current.values() if sub.wildcard else [current[n] for n in sorted(sub.names) if n in current]
        adds = tuple(r for r in wanted if sub.known.get(r.name) != r.version)
        gone = [n for n in sub.known if n not in current]
        if not adds and not gone and not sub.outstanding:
            self.record_in_sync(type_url, sub.version)
        if all(sub.rejected.get(r.name) == r.version for r in adds):
            adds = ()  # only what was rejected, unchanged: wait for a change rather than loop
        removed = gone if send_removals else []
        if not adds and not removed:
            return bool(gone)
        sub.in_flight = {r.name: sub.known.get(r.name) for r in adds}
        for resource in adds:
            sub.known[resource.name] = resource.version
            sub.rejected.pop(resource.name, None)
        for name in removed:
            del sub.known[name]
        sub.nonce, sub.outstanding, sub.version = wire.next_nonce(), True, state_version(sub.known)
        self.record_sent(type_url, sub.version)
        await self.context.write(b"".join([
            self.entry.delta_resources(type_url, self.variant, adds),
            *(wire.text(wire.DELTA_REMOVED, n) for n in removed),
            wire.text(wire.DELTA_SYSTEM_VERSION, sub.version),
            wire.text(wire.DELTA_NONCE, sub.nonce),
        ]))
        return bool(gone) and not send_removals


def _undo_rejected(sub: _Subscription) -> None:
    """After a NACK the client holds what it held before the response: remember what it refused."""
    for name, before in sub.in_flight.items():
        sent = sub.known.pop(name, None)
        if sent is None:
            continue  # unsubscribed since
        sub.rejected[name] = sent
        if before is not None:
            sub.known[name] = before
    sub.version = state_version(sub.known)
