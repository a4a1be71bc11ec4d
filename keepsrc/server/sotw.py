"""State-of-the-world xDS: every response carries the full set of one type (or of the asked names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from keepsrc.server import wire
from keepsrc.server.stream import WILDCARD_TYPES, Stream
from keepsrc.snapshots.snapshot import Resource


@dataclass(slots=True)
class _Subscription:
    wildcard: bool
    names: frozenset[str] = frozenset()
    nonce: str = ""  # of the last response; an ACK or NACK must echo it
    outstanding: bool = False  # the last response is not answered yet
    version: str = ""  # version of the last response (or the one Envoy reported holding)
    held: dict[str, Resource] = field(default_factory=dict)  # what that response carried


class SotwStream(Stream):
    __slots__ = ()
    variant_name = "sotw"

    async def on_request(self, request: DiscoveryRequest) -> None:
        type_url = request.type_url
        sub = self.subscriptions.get(type_url)
        names = frozenset(request.resource_names)
        if sub is None:
            wildcard = type_url in WILDCARD_TYPES and (not names or "*" in names)
            sub = self.subscriptions[type_url] = _Subscription(wildcard, names - {"*"})
            if request.version_info:
                # A reconnect (to us or a restarted server): Envoy already holds this version.
                # Versions are content hashes, so if ours is the same there is nothing to send.
                sub.version = request.version_info
                self.record_ack(type_url, request.version_info)
        elif request.response_nonce != sub.nonce:
            return  # answers an older response; Envoy will answer the newer one (xDS spec)
        else:
            sub.outstanding = False
            if request.HasField("error_detail"):
                # Keep sub.version at the rejected version: it is not sent again until it changes.
                self.record_nack(type_url, sub.version, request.error_detail)
            else:
                self.record_ack(type_url, request.version_info)
            if not sub.wildcard:
                sub.names = names
        await self.respond(type_url, sub, send_removals=not self.removals_pending)
        await self.finish_removals()

    async def respond(self, type_url: str, sub: _Subscription, send_removals: bool) -> bool:
        """Send this type if its content differs from the last response; True if removals were held back."""
        if self.entry is None:
            return False
        current = self.entry.of_type(type_url, self.variant)
        held_back = False
        if sub.wildcard:
            removed = {n: r for n, r in sub.held.items() if n not in current}
            if removed and not send_removals:
                # Make before break: keep what is going away until the replacements are in place.
                held_back = True
                resources = sorted([*current.values(), *removed.values()], key=lambda r: r.name)
                cache_key: object = (type_url, self.variant, frozenset((n, r.version) for n, r in removed.items()))
            else:
                resources = list(current.values())
                cache_key = (type_url, self.variant)
        else:
            resources = [current[n] for n in sorted(sub.names) if n in current]
            if not resources:
                # Nothing asked exists (yet), or Envoy unsubscribed all: an empty response would
                # remove nothing in SotW, and before the first one Envoy should wait, not get [].
                return False
            cache_key = (type_url, self.variant, sub.names)
        version, body = self.entry.sotw_response(type_url, cache_key, resources)
        if version == sub.version:
            return held_back
        sub.nonce, sub.outstanding, sub.version = wire.next_nonce(), True, version
        sub.held = {r.name: r for r in resources}
        self.record_sent(type_url, version)
        await self.context.write(body + wire.text(wire.SOTW_NONCE, sub.nonce))
        return held_back
