"""Hot reload: the file followed through symlinks (a Kubernetes ConfigMap), editor saves and
in-place writes; loads serialized and off the event loop, so streams are served meanwhile."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import pytest

from keepsrc.server import SnapshotCache, TopologySource
from keepsrc.server import reload as reload_module
from keepsrc.snapshots.builder import build_snapshots
from keepsrc.snapshots.snapshot import Snapshot
from keepsrc.store import file as file_store
from keepsrc.topology import check_topology_text
from tests.support.quickstart import QUICKSTART, web_on


def version_of(text: str, node: str = "ingress") -> str:
    topology, diagnostics = check_topology_text(text)
    assert topology is not None, diagnostics
    return build_snapshots(topology)[node].version_info


def served(cache: SnapshotCache, node: str = "ingress") -> str | None:
    snapshot = cache.get(node)
    return snapshot.version_info if snapshot else None


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def watching(path: Path, test: Callable[[TopologySource, SnapshotCache], Awaitable[None]]) -> None:
    """Run `test` with the file loaded and watched, as `keepsrc serve` does."""
    async def main() -> None:
        cache = SnapshotCache()
        source = TopologySource(cache, path)
        assert source.load()
        stop = asyncio.Event()
        watcher = asyncio.create_task(source.watch(stop, debounce_ms=100))
        try:
            await asyncio.sleep(0.3)  # let the watcher start
            await test(source, cache)
        finally:
            stop.set()
            await watcher

    asyncio.run(main())


class ConfigMapVolume:
    """A ConfigMap volume as kubelet's atomic writer keeps it: DIR/topology.yaml -> ..data/topology.yaml,
    ..data -> a timestamped directory, replaced whole on every update."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.updates = 0

    @property
    def path(self) -> Path:
        return self.directory / "topology.yaml"

    def write(self, text: str) -> None:
        """kubelet's sequence: new timestamped dir, a ..data_tmp symlink renamed over ..data, old dir removed."""
        old = os.readlink(self.directory / "..data") if (self.directory / "..data").is_symlink() else None
        self.updates += 1
        stamp = f"..2026_01_01_00_00_{self.updates:02d}.{1000 + self.updates}"
        (self.directory / stamp).mkdir()
        (self.directory / stamp / "topology.yaml").write_text(text)
        os.symlink(stamp, self.directory / "..data_tmp")
        os.replace(self.directory / "..data_tmp", self.directory / "..data")
        if not self.path.is_symlink():
            os.symlink("..data/topology.yaml", self.path)
        if old is not None:
            shutil.rmtree(self.directory / old)


def test_every_configmap_update_is_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    volume = ConfigMapVolume(tmp_path)
    volume.write(web_on(8080))

    async def test(source: TopologySource, cache: SnapshotCache) -> None:
        for update, port in enumerate((8081, 8082, 8083), start=1):
            volume.write(web_on(port))
            await until(lambda update=update: source.loads == 1 + update)  # type: ignore[misc]
            assert served(cache) == version_of(web_on(port))
            assert f"{volume.path} changed" in caplog.text

    with caplog.at_level(logging.INFO, "keepsrc.server"):
        watching(volume.path, test)
    # Only the timestamped directories kubelet created remain: the watcher followed each swap.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["..2026_01_01_00_00_04.1004", "..data", "topology.yaml"]


def test_a_configmap_update_that_leaves_this_file_as_it_was_is_not_loaded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another key of the ConfigMap changed: the whole volume is swapped, this file's content is the same."""
    volume = ConfigMapVolume(tmp_path)
    volume.write(web_on(8080))

    async def test(source: TopologySource, cache: SnapshotCache) -> None:
        served_before = cache.get("ingress")
        volume.write(web_on(8080))
        await until(lambda: f"it reads {tmp_path}/..2026_01_01_00_00_02.1002/topology.yaml" in caplog.text)
        await source.reload()  # and whatever the change asked for
        assert source.loads == 1
        assert cache.get("ingress") is served_before

    with caplog.at_level(logging.INFO, "keepsrc.server"):
        watching(volume.path, test)


def test_an_editor_save_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(web_on(8080))

    async def test(source: TopologySource, cache: SnapshotCache) -> None:
        saved = tmp_path / ".topology.yaml.swp"
        saved.write_text(web_on(8081))
        os.replace(saved, path)
        await until(lambda: source.loads == 2)
        assert served(cache) == version_of(web_on(8081))

    watching(path, test)


def test_an_in_place_write_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(web_on(8080))
    inode = path.stat().st_ino

    async def test(source: TopologySource, cache: SnapshotCache) -> None:
        with path.open("r+") as file:  # same inode, same length: only the content changes
            file.write(web_on(8081))
        await until(lambda: source.loads == 2)
        assert served(cache) == version_of(web_on(8081))

    watching(path, test)
    assert path.stat().st_ino == inode


def test_a_slow_writer_is_read_when_it_closes_the_file_never_half_way(tmp_path: Path) -> None:
    """A copy that pauses mid-file (over a network, `curl -o`): its first half alone is a valid
    topology with one proxy fewer. Read during the pause, it would be served, and that proxy's
    Envoys would lose their config; it must be read only when the writer closes the file."""
    path = tmp_path / "topology.yaml"
    two_proxies = QUICKSTART + """  second:
    listeners:
      - {name: tcp-in, address: "127.0.0.1:10099", protocol: tcp, service: echo}
"""
    path.write_text(two_proxies)
    first_half = web_on(8081)  # on its own: valid, and without `second`
    assert version_of(first_half) != version_of(two_proxies)

    async def test(source: TopologySource, cache: SnapshotCache) -> None:
        with path.open("w") as file:
            file.write(first_half)
            file.flush()
            await asyncio.sleep(0.6)  # longer than any quiet period a watcher could wait for
            assert source.loads == 1 and served(cache) == version_of(two_proxies) and cache.get("second")
            file.write(two_proxies[len(QUICKSTART):])
        await until(lambda: source.loads == 2)
        assert served(cache) == version_of(first_half + two_proxies[len(QUICKSTART):])
        assert cache.get("second") is not None

    watching(path, test)


def test_a_file_removed_and_written_again_is_read_once_with_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`rm` then a new file (scripts that do not rename): the gap is not reported as a missing file."""
    path = tmp_path / "topology.yaml"
    path.write_text(web_on(8080))

    async def test(source: TopologySource, cache: SnapshotCache) -> None:
        path.unlink()
        await asyncio.sleep(0.03)  # within the grace (debounce_ms=100): read at once, it is missing
        path.write_text(web_on(8081))
        await until(lambda: source.loads == 2)
        await asyncio.sleep(0.4)  # past the grace a removal waits for its replacement
        assert served(cache) == version_of(web_on(8081)) and source.loads == 2

    with caplog.at_level(logging.INFO, "keepsrc.server"):
        watching(path, test)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_without_inotify_the_file_is_not_watched_it_says_so_and_sighup_still_reloads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off Linux asyncinotify cannot load: `serve` must still run, and say how to reload."""
    monkeypatch.setattr(file_store, "Inotify", None)
    path = tmp_path / "topology.yaml"
    path.write_text(web_on(8080))

    async def test(source: TopologySource, cache: SnapshotCache) -> None:
        path.write_text(web_on(8081))
        await asyncio.sleep(0.3)
        assert source.loads == 1 and served(cache) == version_of(web_on(8080))
        await source.reload(force=True)  # what SIGHUP does
        assert served(cache) == version_of(web_on(8081))

    with caplog.at_level(logging.WARNING, "keepsrc.server"):
        watching(path, test)
    assert "this system has no inotify; send SIGHUP to reload it" in caplog.text


def test_a_symlink_to_another_directory_is_followed_there_and_when_it_moves(tmp_path: Path) -> None:
    config, first, second = tmp_path / "config", tmp_path / "first", tmp_path / "second"
    for directory in (config, first, second):
        directory.mkdir()
    (first / "topology.yaml").write_text(web_on(8080))
    (second / "topology.yaml").write_text(web_on(8082))
    path = config / "topology.yaml"
    path.symlink_to(first / "topology.yaml")

    async def test(source: TopologySource, cache: SnapshotCache) -> None:
        (first / "topology.yaml").write_text(web_on(8081))  # edited where it lives
        await until(lambda: source.loads == 2)
        assert served(cache) == version_of(web_on(8081))
        (config / "next").symlink_to(second / "topology.yaml")
        os.replace(config / "next", path)  # re-pointed
        await until(lambda: source.loads == 3)
        assert served(cache) == version_of(web_on(8082))
        (second / "topology.yaml").write_text(web_on(8083))  # edited where it lives now
        await until(lambda: source.loads == 4)
        assert served(cache) == version_of(web_on(8083))

    watching(path, test)


def test_sighup_reloads_an_unchanged_file_and_a_change_notice_does_not(tmp_path: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(web_on(8080))

    async def main() -> None:
        source = TopologySource(SnapshotCache(), path)
        assert source.load()
        await source.reload()
        assert source.loads == 1
        await source.reload(force=True)
        assert source.loads == 2

    asyncio.run(main())


def test_loads_never_overlap_and_changes_during_one_make_one_more(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(web_on(8080))
    building = threading.Event()
    release = threading.Event()
    active = 0
    most_active = 0

    def slow_build(topology: object) -> Mapping[str, Snapshot]:
        nonlocal active, most_active
        active += 1
        most_active = max(most_active, active)
        building.set()
        release.wait(10)
        try:
            return build_snapshots(topology)  # type: ignore[arg-type]
        finally:
            active -= 1

    async def main() -> None:
        cache = SnapshotCache()
        source = TopologySource(cache, path)
        assert source.load()
        monkeypatch.setattr(reload_module, "build_snapshots", slow_build)
        path.write_text(web_on(8081))
        source.reload_soon()
        await until(building.is_set)
        path.write_text(web_on(8082))
        for _ in range(3):
            source.reload_soon()
        release.set()
        await source.reload()
        assert (source.loads, most_active) == (3, 1)  # the first load, 8081, then 8082 once
        assert served(cache) == version_of(web_on(8082))

    asyncio.run(main())


def big_topology(services: int, endpoint_port: int) -> str:
    """`services` services of 10 endpoints over 50 proxies, half tcp listeners, half http routes."""
    lines = ["apiVersion: keepsrc/v1", "services:"]
    for i in range(services):
        endpoints = ", ".join(f'"10.{i // 250 % 250}.{i % 250}.{j + 1}:{endpoint_port}"' for j in range(10))
        lines += [f"  svc-{i}:", f"    endpoints: [{endpoints}]"]
    lines.append("proxies:")
    per_proxy = services // 50
    for p in range(50):
        mine = [f"svc-{i}" for i in range(p * per_proxy, (p + 1) * per_proxy)]
        lines += [f"  proxy-{p}:", "    listeners:"]
        for k, name in enumerate(mine[: len(mine) // 2]):
            lines.append(f"      - {{name: tcp-{k}, address: 0.0.0.0:{10000 + k}, protocol: tcp, service: {name}}}")
        routes = ", ".join(f"{{prefix: /{name}, service: {name}}}" for name in mine[len(mine) // 2:])
        lines.append(f"      - {{name: http, address: 0.0.0.0:8000, protocol: http, routes: [{routes}]}}")
    return "\n".join(lines) + "\n"


def test_streams_are_served_while_a_big_file_reloads(tmp_path: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(big_topology(5000, 8080))

    async def main() -> None:
        cache = SnapshotCache()
        source = TopologySource(cache, path)
        assert source.load()
        before = cache.get("proxy-0")
        path.write_text(big_topology(5000, 8081))
        ticks: list[float] = []
        seen: list[Snapshot | None] = []

        async def heartbeat() -> None:
            while True:  # what every stream of the server needs: the loop, and the cache
                ticks.append(time.perf_counter())
                seen.append(cache.get("proxy-0"))
                await asyncio.sleep(0.005)

        beating = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        await source.reload()
        load_time = time.perf_counter() - started
        await asyncio.sleep(0.05)
        beating.cancel()
        after = cache.get("proxy-0")
        assert source.loads == 2 and after is not before
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert max(gaps) < load_time / 4, (max(gaps), load_time)
        # The last good snapshot is served until the new one is swapped in whole, never anything else.
        swapped = seen.index(after)
        assert set(map(id, seen[:swapped])) == {id(before)} and set(map(id, seen[swapped:])) == {id(after)}
        assert sum(started <= t for t in ticks[:swapped]) > 10  # served during the load, not only before it

    asyncio.run(main())
