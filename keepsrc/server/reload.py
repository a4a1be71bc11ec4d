"""Topology file -> SnapshotCache, on start, on every change of the file (watchfiles) and on SIGHUP.

An invalid file never reaches the cache: its errors are logged as file:line:col and the last good
snapshots stay in service until a later change fixes it.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from pathlib import Path

from watchfiles import Change, awatch

from keepsrc.server.cache import SnapshotCache
from keepsrc.snapshots.builder import build_snapshots
from keepsrc.topology.diagnostics import Severity
from keepsrc.topology.loader import check_topology, check_topology_text

log = logging.getLogger("keepsrc.server")

BUILTIN_NAME = "<built-in quickstart.yaml>"


class TopologySource:
    """Loads the topology into the cache; `path=None` serves the built-in example (never reloaded)."""

    def __init__(self, cache: SnapshotCache, path: Path | None) -> None:
        self.cache = cache
        self.path = path
        self.loads = 0  # successful loads, for tests and `status`

    @property
    def name(self) -> str:
        return str(self.path) if self.path else BUILTIN_NAME

    def load(self) -> bool:
        """Validate, build and swap in one step; False (and the old snapshots kept) on any error."""
        if self.path is None:
            text = resources.files("keepsrc").joinpath("examples/quickstart.yaml").read_text(encoding="utf-8")
            topology, diagnostics = check_topology_text(text, BUILTIN_NAME)
        else:
            topology, diagnostics = check_topology(self.path)
        for diagnostic in diagnostics:
            (log.error if diagnostic.severity is Severity.ERROR else log.warning)("%s", diagnostic)
        if topology is None:
            kept = "no snapshot is served yet" if self.loads == 0 else "keeping the last good snapshots"
            log.error("%s is invalid (%d errors); %s", self.name,
                      sum(d.severity is Severity.ERROR for d in diagnostics), kept)
            return False
        snapshots = build_snapshots(topology)
        self.cache.set_all(snapshots)
        self.loads += 1
        log.info("loaded %s: %d proxies (%s)", self.name, len(snapshots),
                 ", ".join(f"{k}@{s.version_info}" for k, s in sorted(snapshots.items())) or "none")
        return True

    async def watch(self, stop: asyncio.Event, debounce_ms: int = 200) -> None:
        """Reload on every change of the file until `stop` is set.

        The directory is watched, not the file: editors and `kubectl cp` replace the file by
        renaming a new one over it, which a watch on the old inode would never see.
        """
        if self.path is None:
            return
        target = self.path.resolve()

        def is_target(change: Change, path: str) -> bool:
            return Path(path).resolve() == target

        async for _changes in awatch(target.parent, watch_filter=is_target, debounce=debounce_ms, step=50,
                                     stop_event=stop, recursive=False):
            log.info("%s changed; reloading", self.name)
            self.load()
