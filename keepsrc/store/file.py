"""A topology file on local disk (`keepsrc serve FILE`), followed through symlinks, and the
built-in example (`keepsrc serve` with no file)."""

from __future__ import annotations

import asyncio
import logging
import os
from abc import abstractmethod
from collections.abc import Callable
from contextlib import aclosing
from importlib import resources
from pathlib import Path

from watchfiles import Change, awatch

from keepsrc.store.base import Content, Store

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


class LocalStore(Store):
    """A store on this machine: readable without an event loop (`TopologySource.load()`)."""

    @abstractmethod
    def read_now(self) -> Content:
        """`read()` on this thread."""

    async def read(self) -> Content:
        # Off the loop: a 64 MiB file takes a while, and every xDS stream is served by the loop.
        return await asyncio.to_thread(self.read_now)


class BuiltinStore(LocalStore):
    """The example shipped inside the package; it never changes."""

    name = BUILTIN_NAME

    def read_now(self) -> Content:
        data = resources.files("keepsrc").joinpath("examples/quickstart.yaml").read_bytes()
        return Content(BUILTIN_NAME, data)

    async def watch(self, stop: asyncio.Event, changed: Callable[[], None], debounce_ms: int = 200) -> None:
        return


class FileStore(LocalStore):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    def read_now(self) -> Content:
        try:
            return Content(self.name, self.path.read_bytes())
        except OSError as exc:
            return Content(self.name, None, problem=f"cannot read topology file: {exc.strerror or exc}")

    async def watch(self, stop: asyncio.Event, changed: Callable[[], None], debounce_ms: int = 200) -> None:
        """Directories are watched, not the file: editors and `kubectl cp` rename a new file over
        it, and Kubernetes swaps a ConfigMap's `..data` symlink to a new directory; a watch on the
        old inode (or the old directory) would never see either. The watched set follows the file:
        when a change moves its target to another directory, the watch moves with it.
        """
        while not stop.is_set():
            _, met = resolution(self.path)
            relevant = set(met)
            directories = sorted({p.parent for p in met if p.parent.is_dir()})
            changed()  # anything that changed while no watch was armed (or between two watches)

            def is_relevant(change: Change, path: str, relevant: set[Path] = relevant) -> bool:
                return Path(path) in relevant

            watcher = awatch(*directories, watch_filter=is_relevant, debounce=debounce_ms, step=50,
                             stop_event=stop, recursive=False)
            async with aclosing(watcher):  # closed on break too: its notify thread stops with it
                async for changes in watcher:
                    target, now_met = resolution(self.path)
                    log.info("%s changed (%s); it reads %s", self.name,
                             ", ".join(sorted(f"{path} {change.name}" for change, path in changes)), target)
                    changed()
                    if set(now_met) != relevant:
                        break  # watch what the path resolves through now
