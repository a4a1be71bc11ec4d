"""Topology file -> SnapshotCache, on start, on every change of the file (watchfiles) and on SIGHUP.

An invalid file never reaches the cache: its errors are logged as file:line:col and the last good
snapshots stay in service until a later change fixes it.

Reloads run off the event loop: reading, validating and building a 5,000-service file takes
seconds, and every xDS stream is served by the loop. Only the swap into the cache runs on it.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import aclosing, contextmanager
from importlib import resources
from pathlib import Path

from watchfiles import Change, awatch

from keepsrc.server.cache import SnapshotCache
from keepsrc.snapshots.builder import build_snapshots
from keepsrc.snapshots.snapshot import Snapshot
from keepsrc.topology.diagnostics import Diagnostic, Severity
from keepsrc.topology.loader import check_topology, check_topology_text
from keepsrc.topology.model import Topology

log = logging.getLogger("keepsrc.server")

BUILTIN_NAME = "<built-in quickstart.yaml>"
MAX_SYMLINKS = 40  # as the kernel: more links in one lookup is a loop (ELOOP)


def resolution(path: Path) -> tuple[Path, list[Path]]:
    """What `path` resolves to, and every path met on the way there, in order.

    Resolved component by component as the kernel does, starting from the directory of `path`
    as given: for a Kubernetes ConfigMap (`DIR/topology.yaml -> ..data/topology.yaml`,
    `..data -> ..2026_01_01_...`) that is `DIR/topology.yaml`, `DIR/..data`, `DIR/..2026_...` and
    `DIR/..2026_.../topology.yaml`. A change to any of them can change what the path reads.
    """
    current = path.absolute().parent
    pending = [path.name]
    met: list[Path] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        met.append(candidate)
        if candidate.is_symlink() and links < MAX_SYMLINKS:
            links += 1
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current = Path(target.anchor)
            pending[:0] = target.parts[1:] if target.is_absolute() else target.parts
        else:
            current = candidate
    return current, met


@contextmanager
def _cycle_collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (process-wide) for one load.

    A load allocates millions of objects that all stay alive until it ends (or die by refcount).
    Meanwhile the collector would walk the whole heap again and again, holding the GIL 50-300 ms
    each time and stalling the event loop; paused, the stalls are the GIL's own switching.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class TopologySource:
    """Loads the topology into the cache; `path=None` serves the built-in example (never reloaded)."""

    def __init__(self, cache: SnapshotCache, path: Path | None) -> None:
        self.cache = cache
        self.path = path
        self.loads = 0  # successful loads, for tests and `status`
        # Loads never overlap: `load()` from any thread and the reload thread take this lock.
        self._loading = threading.Lock()
        self._attempted: str | None = None  # sha256 of the content of the last load attempt
        self._generation = 0  # of the last load attempt; a result older than the one swapped in is dropped
        self._swapped = 0
        self._reloader: asyncio.Task[None] | None = None
        self._again = False  # a reload was asked for while one ran
        self._force = False

    @property
    def name(self) -> str:
        return str(self.path) if self.path else BUILTIN_NAME

    def load(self) -> bool:
        """Validate, build and swap in one step, on this thread; False (old snapshots kept) on any error.

        For the first load; reloads from a running server go through `reload` or `reload_soon`,
        which keep the event loop free.
        """
        prepared = self._prepare(force=True)
        if prepared is None:
            return False
        self._swap_in(*prepared)
        return True

    def reload_soon(self, force: bool = False) -> asyncio.Task[None]:
        """Reload in a worker thread, then swap the snapshots in on this loop.

        Reloads are serialized: asked for while one runs, they make one more after it, however
        many were asked for. Unless `force`d (SIGHUP), a file whose content is what the last load
        read is not loaded again.
        """
        self._again = True
        self._force |= force
        if self._reloader is None or self._reloader.done():
            self._reloader = asyncio.get_running_loop().create_task(self._reload_while_asked())
        return self._reloader

    async def reload(self, force: bool = False) -> None:
        """`reload_soon`, and wait until it (and any reload asked for meanwhile) is done."""
        # shield: a caller that gives up waiting must not cancel a load other callers asked for.
        await asyncio.shield(self.reload_soon(force))

    async def _reload_while_asked(self) -> None:
        while self._again:
            force, self._again, self._force = self._force, False, False
            try:
                prepared = await asyncio.to_thread(self._prepare, force)
            except Exception:  # a bug in one load must not end hot reload for the server's lifetime
                log.exception("reloading %s failed; keeping the last good snapshots", self.name)
                continue
            if prepared is not None:
                self._swap_in(*prepared)

    def _prepare(self, force: bool) -> tuple[int, dict[str, Snapshot]] | None:
        """Read, validate and build (any thread): (generation, snapshots), or None to keep what is served."""
        with self._loading, _cycle_collector_paused():
            self._generation += 1
            topology = self._read(force)
            return None if topology is None else (self._generation, build_snapshots(topology))

    def _read(self, force: bool) -> Topology | None:
        if self.path is None:
            text = resources.files("keepsrc").joinpath("examples/quickstart.yaml").read_text(encoding="utf-8")
            return self._checked(*check_topology_text(text, BUILTIN_NAME))
        try:
            data = self.path.read_bytes()
            # utf-8-sig: editors on Windows save a byte-order mark, which is not part of the YAML.
            text = data.decode("utf-8-sig")
        except (OSError, UnicodeDecodeError):
            self._attempted = None
            return self._checked(*check_topology(self.path))  # says what is wrong, with file:line:col
        # What was read last time may have moved (a ConfigMap swap for another key): same bytes, same load.
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._attempted and not force:
            log.debug("%s: content unchanged; nothing to load", self.name)
            return None
        self._attempted = digest
        return self._checked(*check_topology_text(text, self.name))

    def _checked(self, topology: Topology | None, diagnostics: list[Diagnostic]) -> Topology | None:
        for diagnostic in diagnostics:
            (log.error if diagnostic.severity is Severity.ERROR else log.warning)("%s", diagnostic)
        if topology is None:
            kept = "no snapshot is served yet" if self.loads == 0 else "keeping the last good snapshots"
            log.error("%s is invalid (%d errors); %s", self.name,
                      sum(d.severity is Severity.ERROR for d in diagnostics), kept)
        return topology

    def _swap_in(self, generation: int, snapshots: Mapping[str, Snapshot]) -> None:
        if generation < self._swapped:
            return  # a load that started later has already been swapped in
        self._swapped = generation
        self.cache.set_all(snapshots)
        self.loads += 1
        log.info("loaded %s: %d proxies (%s)", self.name, len(snapshots),
                 ", ".join(f"{k}@{s.version_info}" for k, s in sorted(snapshots.items())) or "none")

    async def watch(self, stop: asyncio.Event, debounce_ms: int = 200) -> None:
        """Reload on every change of what the file resolves to, or of its content, until `stop` is set.

        Directories are watched, not the file: editors and `kubectl cp` rename a new file over it,
        and Kubernetes swaps a ConfigMap's `..data` symlink to a new directory; a watch on the old
        inode (or the old directory) would never see either. The watched set follows the file:
        when a change moves its target to another directory, the watch moves with it.
        """
        if self.path is None:
            return
        while not stop.is_set():
            _, met = resolution(self.path)
            relevant = set(met)
            directories = sorted({p.parent for p in met if p.parent.is_dir()})
            # Anything that changed while no watch was armed (or between two watches).
            self.reload_soon()

            def is_relevant(change: Change, path: str, relevant: set[Path] = relevant) -> bool:
                return Path(path) in relevant

            watcher = awatch(*directories, watch_filter=is_relevant, debounce=debounce_ms, step=50,
                             stop_event=stop, recursive=False)
            async with aclosing(watcher):  # closed on break too: its notify thread stops with it
                async for changes in watcher:
                    target, now_met = resolution(self.path)
                    log.info("%s changed (%s); it reads %s", self.name,
                             ", ".join(sorted(f"{path} {change.name}" for change, path in changes)), target)
                    self.reload_soon()
                    if set(now_met) != relevant:
                        break  # watch what the path resolves through now
