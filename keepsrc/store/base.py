"""The Store boundary: where the topology text comes from, and how a server learns it changed.

A store hands out `Content` (the bytes, the name diagnostics use, the store revision they were
read at) and calls back when what it holds may have changed. What a change *is* stays level-based:
the caller reads the whole topology again, so a missed or doubled notification costs one read,
never a wrong config.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from keepsrc.topology.diagnostics import Diagnostic
from keepsrc.topology.loader import check_topology_bytes
from keepsrc.topology.model import Topology


class StoreError(Exception):
    """The store cannot be read or written now (unreachable, refused); what is served stays."""


class ConflictError(StoreError):
    """A write lost a race: the store moved on since the revision the writer started from."""


@dataclass(frozen=True, slots=True)
class Content:
    name: str  # what diagnostics name: the path, or etcd://.../prefix/topology.yaml@revision
    data: bytes | None  # None: nothing to load (the store holds no topology yet, or could not be read)
    revision: int | None = None  # the store revision of this content; None for a local file
    problem: str | None = None  # why a file could not be read (data is None); an error diagnostic

    @property
    def empty(self) -> bool:
        """The store holds no topology yet (a fresh etcd prefix): not an error, nothing to serve."""
        return self.data is None and self.problem is None


def check_content(content: Content) -> tuple[Topology | None, list[Diagnostic]]:
    """Validate content exactly as `keepsrc validate` validates a file, naming `content.name`."""
    if content.data is None:
        return None, [Diagnostic(content.name, 1, 1, "", content.problem or "no topology is stored")]
    return check_topology_bytes(content.data, content.name)


class Store(ABC):
    """A topology source: a local file (or the built-in example), or a store replicas share."""

    name: str
    # True for a store several replicas read (etcd): content carries revisions, which order the
    # replicas where content hashes cannot, and `latest_revision` answers what is newest.
    shared = False

    @abstractmethod
    async def read(self) -> Content:
        """The whole topology as stored now; raises StoreError when the store cannot be reached."""

    @abstractmethod
    async def watch(self, stop: asyncio.Event, changed: Callable[[], None], debounce_ms: int = 200) -> None:
        """Call `changed()` whenever what `read()` returns may have changed, until `stop` is set.
        Also once at the start: anything may have changed while nobody watched. `debounce_ms`:
        how long a file store waits, after the file is removed, for its replacement."""

    async def latest_revision(self) -> int | None:
        """The store's newest revision of the topology (shared stores); raises StoreError."""
        return None

    async def close(self) -> None:  # noqa: B027 (a local store holds nothing to release)
        """Release connections; the store is not used afterwards."""


async def until_stopped(stop: asyncio.Event, work: object) -> None:
    """Run `work` (a coroutine) until it returns or `stop` is set."""
    task = asyncio.ensure_future(work)  # type: ignore[arg-type]
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopped):
            pending.cancel()
        await asyncio.gather(task, stopped, return_exceptions=True)
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
