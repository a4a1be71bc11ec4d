"""A topology file on local disk (`keepsrc serve FILE`), followed through symlinks, and the
built-in example (`keepsrc serve` with no file)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from abc import abstractmethod
from collections.abc import Callable
from importlib import resources
from pathlib import Path

try:  # Linux's inotify. Elsewhere (asyncinotify raises on import) a file is reloaded on SIGHUP only.
    from asyncinotify import Inotify, Mask
except (ImportError, RuntimeError, OSError):
    Inotify = Mask = None  # type: ignore[assignment,misc]

from keepsrc.store.base import Content, Store, until_stopped

log = logging.getLogger("keepsrc.server")

BUILTIN_NAME = "<built-in quickstart.yaml>"
MAX_SYMLINKS = 40  # as the kernel: more links in one lookup is a loop (ELOOP)
# inotify events on the directories the path resolves through. COMPLETE: the file (or a symlink on
# the way) is whole now. GONE: it went away; a replacement may follow. REARM: the watch itself is
# gone (a watched directory removed or moved) or events were lost (queue overflow).
if Mask is not None:
    COMPLETE = Mask.CLOSE_WRITE | Mask.MOVED_TO
    GONE = Mask.DELETE | Mask.MOVED_FROM | Mask.ATTRIB
    REARM = Mask.IGNORED | Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.UNMOUNT | Mask.Q_OVERFLOW
    WATCHED = COMPLETE | GONE | Mask.CREATE | Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.ONLYDIR


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

        A change is read when it is complete, not after a quiet period: when a writer closes the
        file, or a file or symlink is renamed (or linked) into place, it is read at once. A write
        still open is never read, however slowly it goes (a copy over the network, `curl -o`), so
        half a file is never served, even one that would be valid. The file being removed or
        renamed away waits `debounce_ms` for its replacement before it is reported missing.
        """
        if Inotify is None:
            log.warning("%s is not watched: this system has no inotify; send SIGHUP to reload it", self.name)
            await stop.wait()
            return
        while not stop.is_set():
            _, met = resolution(self.path)
            relevant = set(met)
            directories = sorted({p.parent for p in met if p.parent.is_dir()})
            changed()  # anything that changed while no watch was armed (or between two watches)
            with Inotify() as inotify:
                for directory in directories:
                    with contextlib.suppress(OSError):  # gone meanwhile: the next resolution sees it
                        inotify.add_watch(directory, WATCHED)
                await until_stopped(stop, self._follow(inotify, relevant, changed, debounce_ms / 1000))

    async def _follow(self, inotify: Inotify, relevant: set[Path], changed: Callable[[], None], grace: float) -> None:
        """Calls `changed` for each complete change; returns when the watched set must move."""
        loop = asyncio.get_running_loop()
        missing: asyncio.TimerHandle | None = None

        def read(what: str) -> None:
            nonlocal missing
            if missing is not None:
                missing.cancel()
                missing = None
            log.info("%s changed (%s); it reads %s", self.name, what, resolution(self.path)[0])
            changed()

        try:
            async for event in inotify:
                if event.mask & REARM or event.path is None:
                    return  # a watched directory went away, or events were lost: watch afresh
                if event.path not in relevant:
                    continue
                what = f"{event.path} {(event.mask & ~Mask.ISDIR).name}"
                if event.mask & COMPLETE or (event.mask & Mask.CREATE and event.path.is_symlink()):
                    read(what)
                elif event.mask & GONE:
                    if missing is not None:
                        missing.cancel()
                    missing = loop.call_later(grace, read, what)
                # A new regular file's CREATE: its CLOSE_WRITE follows (writes, MODIFY, are not watched).
                if set(resolution(self.path)[1]) != relevant:
                    return  # watch what the path resolves through now
        finally:
            if missing is not None:
                missing.cancel()  # on a new watch, the first thing is a read anyway
