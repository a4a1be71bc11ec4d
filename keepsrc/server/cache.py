"""SnapshotCache: which Snapshot each proxy entry is served, who is watching it, and what each node ACKed.

Modelled on go-control-plane's pkg/cache/v3: the cache knows nothing about gRPC. Streams register
as watchers of the keys their Envoy may map to (node.id, then node.cluster) and are woken when a
key's snapshot changes; they pull the new snapshot themselves and decide what to send.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from keepsrc.server import wire
from keepsrc.server.per_type import REWRITTEN_TYPES, per_type_variant
from keepsrc.snapshots.snapshot import Resource, Snapshot, content_version

log = logging.getLogger("keepsrc.server")


class Watcher(Protocol):
    def snapshot_changed(self) -> None: ...


def state_version(resources: Mapping[str, str]) -> str:
    """The version of a set of resources (name -> version); equals Snapshot.version for a full type."""
    return content_version("\n".join(f"{n}={v}" for n, v in sorted(resources.items())).encode())


class _Encodings:
    """Encoded responses of one Entry, bounded in bytes (oldest dropped first).

    Keys are always what is served (resource names of the snapshot), never raw client input, and
    the byte budget is a multiple of the snapshot's own size: a client asking for many distinct
    subsets costs re-encoding, never unbounded memory.
    """

    __slots__ = ("_items", "_size", "budget")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: dict[object, tuple[int, object]] = {}
        self._size = 0

    def get(self, key: object) -> object | None:
        item = self._items.get(key)
        return None if item is None else item[1]

    def put(self, key: object, value: object, size: int) -> None:
        if size > self.budget:
            return
        self._items[key] = (size, value)
        self._size += size
        while self._size > self.budget:
            oldest = next(iter(self._items))
            self._size -= self._items.pop(oldest)[0]


# Encodings may take this many times the snapshot's own bytes (each legitimate subscription's
# response is at most the whole snapshot; a fleet shares a handful of them).
ENCODING_BUDGET_FACTOR = 4
MIN_ENCODING_BUDGET = 1 << 20


class Entry:
    """One snapshot plus the responses already encoded from it, shared by every stream it serves.

    A fleet of identical Envoys maps to one Entry, so a push to N of them encodes each response
    once; the Entry (and its encodings) is dropped when the key gets a different snapshot.
    """

    __slots__ = ("_any", "_encodings", "_variants", "_wildcard_versions", "created", "key", "snapshot")

    def __init__(self, key: str, snapshot: Snapshot) -> None:
        self.key = key
        self.snapshot = snapshot
        self.created = time.monotonic()  # when the topology change that made it reached the cache
        self._variants: dict[tuple[str, str], Mapping[str, Resource]] = {}
        self._wildcard_versions: dict[tuple[str, str], str] = {}
        self._any: dict[tuple[str, str, str], bytes] = {}
        self._encodings = _Encodings(max(MIN_ENCODING_BUDGET, ENCODING_BUDGET_FACTOR * snapshot.size))

    def of_type(self, type_url: str, variant: str) -> Mapping[str, Resource]:
        """The resources of a type as a stream of `variant` sees them ("" for ADS; see per_type.py)."""
        if not variant or type_url not in REWRITTEN_TYPES:
            return self.snapshot.of_type(type_url)
        resources = self._variants.get((type_url, variant))
        if resources is None:
            resources = self._variants[(type_url, variant)] = {
                name: per_type_variant(resource, delta=variant == "delta")
                for name, resource in self.snapshot.of_type(type_url).items()
            }
        return resources

    def wildcard_version(self, type_url: str, variant: str) -> str:
        """The SotW version of every resource of a type (what a wildcard subscriber holds once in sync)."""
        if not variant or type_url not in REWRITTEN_TYPES:
            return self.snapshot.version(type_url)  # the same resources: the snapshot's own version
        version = self._wildcard_versions.get((type_url, variant))
        if version is None:
            resources = self.of_type(type_url, variant)
            version = self._wildcard_versions[(type_url, variant)] = state_version(
                {n: r.version for n, r in resources.items()})
        return version

    def _any_bytes(self, resource: Resource) -> bytes:
        key = (resource.type_url, resource.name, resource.version)
        encoded = self._any.get(key)
        if encoded is None:
            any_bytes = wire.any_message(resource.type_url, resource.body)
            encoded = self._any[key] = wire.field(wire.SOTW_RESOURCES, any_bytes)
        return encoded

    def sotw_response(self, type_url: str, cache_key: object, resources: Callable[[], list[Resource]],
                      version: str | None = None) -> tuple[str, bytes]:
        """(version, DiscoveryResponse bytes without a nonce) for `resources()`, sorted by name;
        `version`, when the caller knows it (all of a type: `wildcard_version`), is not hashed again.

        `cache_key` must identify `resources` within this snapshot, built from what is served
        (names of this snapshot, versions of resources kept from an older one), never from
        what a client asked for, so that equal responses share one encoding.
        """
        cached = self._encodings.get(cache_key)
        if cached is None:
            listed = resources()
            if version is None:
                version = state_version({r.name: r.version for r in listed})
            body = b"".join(
                [wire.text(wire.SOTW_VERSION_INFO, version), *(self._any_bytes(r) for r in listed),
                 wire.text(wire.SOTW_TYPE_URL, type_url)]
            )
            cached = (version, body)
            self._encodings.put(cache_key, cached, len(body))
        return cached  # type: ignore[return-value]

    def delta_resources(self, type_url: str, variant: str, resources: tuple[Resource, ...]) -> bytes:
        """The encoded `resources` field entries of a DeltaDiscoveryResponse, plus its type_url."""
        cache_key = ("delta", type_url, variant, tuple(r.name for r in resources))
        cached = self._encodings.get(cache_key)
        if cached is None:
            entries = [
                wire.field(wire.DELTA_RESOURCES, wire.delta_resource(r.name, r.version, r.type_url, r.body))
                for r in resources
            ]
            cached = b"".join([*entries, wire.text(wire.DELTA_TYPE_URL, type_url)])
            self._encodings.put(cache_key, cached, len(cached))
        return cached  # type: ignore[return-value]

    def retire(self) -> None:
        """Keep only the snapshot: a superseded Entry stays in the history for reconnects, not its encodings."""
        self._any.clear()
        self._encodings = _Encodings(0)


# slots: one NodeStatus and a TypeStatus per type exist for every connected Envoy.
@dataclass(frozen=True, slots=True)
class Nack:
    version: str  # the version the node rejected
    code: int
    message: str
    at: float  # time.time() when it arrived


@dataclass(slots=True)
class TypeStatus:
    sent: str = ""  # last version sent (or, after a reconnect, reported as held)
    acked: str = ""  # last version the node accepted: the node's actual state
    nack: Nack | None = None  # the rejection the node's state still reflects; cleared once it no longer does
    responses: int = 0  # responses sent for this type, over all of the node's streams
    waiting: bool = False  # a newer version is ready but waits (one response in flight per type)


@dataclass(slots=True)
class NodeStatus:
    node_id: str
    cluster: str
    key: str | None = None  # the proxy entry serving it; None while the topology does not know it
    streams: int = 0  # open streams
    types: dict[str, TypeStatus] = field(default_factory=dict)

    def of(self, type_url: str) -> TypeStatus:
        status = self.types.get(type_url)
        if status is None:
            status = self.types[type_url] = TypeStatus()
        return status


class SnapshotCache:
    """node key (a proxy name: an Envoy's node.id, else its node.cluster) -> Snapshot, with watchers.

    Call set/set_all/remove from any thread; watchers are always woken on the event loop that
    serves them.
    """

    # Superseded entries kept per key, so a SotW Envoy that reconnects holding one of them is
    # known to hold exactly those resources (and keeps make-before-break on the next change).
    HISTORY = 4

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._history: dict[str, deque[Entry]] = {}
        # (key, type, variant) -> version -> resources of SotW make-before-break sets sent lately.
        self._served: dict[tuple[str, str, str], dict[str, Mapping[str, Resource]]] = {}
        self._watchers: dict[str, set[Watcher]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_loaded: list[Callable[[], None]] = []
        self.status: dict[str, NodeStatus] = {}  # by node.id, for the nodes connected now
        # Until the first snapshots arrive the server refuses streams (and says NOT_SERVING), so
        # a fresh replica never hands an Envoy an empty config.
        self.loaded = False
        # The store revision the snapshots were built from (None: a file, or set in code). Replicas
        # of one store agree on it, and it orders them where content hashes cannot.
        self.revision: int | None = None
        # Set by a shared store: whether the loaded revision is the store's newest. A stream whose
        # Envoy reports a config this server never served asks before replacing it, so an Envoy
        # that reconnects to a lagging replica is not moved back to an older topology.
        self.freshness: Callable[[], Awaitable[bool]] | None = None

    # -- snapshots --------------------------------------------------------------------------
    def get(self, key: str) -> Snapshot | None:
        entry = self._entries.get(key)
        return entry.snapshot if entry else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def set(self, key: str, snapshot: Snapshot) -> None:
        """Serve `snapshot` to every Envoy whose node.id (else node.cluster) is `key`."""
        self._apply({key: snapshot}, replace_all=False)

    def set_all(self, snapshots: Mapping[str, Snapshot], revision: int | None = None) -> None:
        """Swap the whole key space at once (a topology reload): keys not given are removed.
        `revision`: the store revision it was built from, if any."""
        self._apply(dict(snapshots), replace_all=True, revision=revision)

    def on_loaded(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the serving loop) once the first snapshots are in; now if they are."""
        if self.loaded:
            callback()
        else:
            self._on_loaded.append(callback)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve watchers on `loop`: changes from other threads hop onto it."""
        self._loop = loop

    def remove(self, key: str) -> None:
        self._apply({key: None}, replace_all=False)

    def _apply(self, changes: Mapping[str, Snapshot | None], replace_all: bool, revision: int | None = None) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed() and _running_loop() is not loop:
            loop.call_soon_threadsafe(self._apply, changes, replace_all, revision)
            return
        revised = revision is not None and revision != self.revision
        if revision is not None:
            self.revision = revision
        if replace_all:
            changes = {**dict.fromkeys(self._entries), **changes}
        changed = []
        for key, snapshot in changes.items():
            old = self._entries.get(key)
            if snapshot is None:
                if old is not None:
                    del self._entries[key]
                    self._history.pop(key, None)
                    for served in [k for k in self._served if k[0] == key]:
                        del self._served[served]
                    changed.append(key)
            # Content-addressed versions: an identical rebuild keeps the old Entry and its encodings.
            elif old is None or (old.snapshot.version_info, old.snapshot.identities) != (
                    snapshot.version_info, snapshot.identities):
                self._entries[key] = Entry(key, snapshot)
                if old is not None:
                    old.retire()
                    self._history.setdefault(key, deque(maxlen=self.HISTORY)).appendleft(old)
                changed.append(key)
        # A topology load counts even when it has no proxies: it is what the operator asked for.
        if not self.loaded and (replace_all or any(snapshot is not None for snapshot in changes.values())):
            self.loaded = True
            callbacks, self._on_loaded = self._on_loaded, []
            for callback in callbacks:
                callback()
        if revised and self.freshness is not None:
            # A stream holding back a diverged Envoy (see `freshness`) asks again, even where
            # this revision left its snapshot as it was.
            changed = list(self._watchers)
        for key in changed:
            for watcher in list(self._watchers.get(key, ())):
                watcher.snapshot_changed()

    def resolve(self, node_id: str, node_cluster: str) -> Entry | None:
        """The entry for a node: by node.id first, else node.cluster (a fleet of identical Envoys)."""
        return self._entries.get(node_id) or (self._entries.get(node_cluster) if node_cluster else None)

    def held_resources(self, entry: Entry, type_url: str, variant: str, version: str) -> Mapping[str, Resource] | None:
        """The resources of a SotW wildcard response (all of a type, or a make-before-break set that
        kept some going away) recently served from `entry`'s key under `version`: what a
        reconnecting SotW Envoy reports holding. None if unknown."""
        for candidate in (entry, *self._history.get(entry.key, ())):
            if candidate.wildcard_version(type_url, variant) == version:
                return candidate.of_type(type_url, variant)
        return self._served.get((entry.key, type_url, variant), {}).get(version)

    def remember_served(self, key: str, type_url: str, variant: str, version: str,
                        resources: Mapping[str, Resource]) -> None:
        """Record a make-before-break set sent for `key`: an Envoy may reconnect holding exactly it."""
        served = self._served.setdefault((key, type_url, variant), {})
        served[version] = resources
        while len(served) > self.HISTORY:
            del served[next(iter(served))]

    def resource_at(self, entry: Entry, type_url: str, variant: str, name: str, version: str) -> Resource | None:
        """The resource `name` at `version` in `entry` or a recent predecessor (delta: what a client holds)."""
        for candidate in (entry, *self._history.get(entry.key, ())):
            resource = candidate.of_type(type_url, variant).get(name)
            if resource is not None and resource.version == version:
                return resource
        return None

    # -- watchers (streams) -----------------------------------------------------------------
    def watch(self, watcher: Watcher, keys: tuple[str, ...]) -> None:
        self._loop = asyncio.get_running_loop()
        for key in keys:
            self._watchers.setdefault(key, set()).add(watcher)

    def unwatch(self, watcher: Watcher, keys: tuple[str, ...]) -> None:
        for key in keys:
            watchers = self._watchers.get(key)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[key]

    # -- node status ------------------------------------------------------------------------
    def forget(self, status: NodeStatus) -> None:
        if self.status.get(status.node_id) is status:
            del self.status[status.node_id]

    def node_status(self, node_id: str, cluster: str) -> NodeStatus:
        status = self.status.get(node_id)
        if status is None:
            status = self.status[node_id] = NodeStatus(node_id, cluster)
        return status


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
