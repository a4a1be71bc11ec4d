"""Helpers for tests that put the keepsrc xDS server in front of real Envoys and change things under them.

- `FLAVOURS`: every way an Envoy can speak xDS to keepsrc (ADS or per-type, SotW or delta);
- `SeqLab`: backends on loopback and a topology file a test rewrites (listeners on and off, a
  service's connect_timeout and lb, which service the TCP listener uses);
- `XdsServerThread`: the server with hot reload on its own event loop, on a TCP port (fixed, so a
  restarted server takes the same one) or a unix socket;
- reading an Envoy: listeners and clusters from /config_dump, CSDS (`keepsrc status`) from the server;
- `Traffic`: a thread that keeps connecting through an Envoy and counts every failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.status.v3 import csds_pb2

from keepsrc.demo.backends import HttpBackend, TcpBackend, tcp_first_word
from keepsrc.server import SnapshotCache, TopologySource, start
from keepsrc.server.service import XdsServer
from keepsrc.server.status import fetch
from keepsrc.snapshots.bootstrap import XdsApi, XdsTransport, xds_bootstrap
from keepsrc.snapshots.render import to_dict
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE
from keepsrc.store import LocalStore, Store
from keepsrc.topology.model import SocketAddress
from tests.support.envoy import Envoy, free_port

ALL = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
FLAVOURS: dict[str, tuple[XdsApi, XdsTransport]] = {
    "ads-sotw": (XdsApi.SOTW, XdsTransport.ADS),
    "ads-delta": (XdsApi.DELTA, XdsTransport.ADS),
    "per-type-sotw": (XdsApi.SOTW, XdsTransport.PER_TYPE),
    "per-type-delta": (XdsApi.DELTA, XdsTransport.PER_TYPE),
}
ADS_FLAVOURS = ["ads-sotw", "ads-delta"]
DELTA_FLAVOURS = ["ads-delta", "per-type-delta"]
# Envoy's default initial_fetch_timeout: a warming cluster or listener that waits for it is the bug
# these tests look for. Waits that prove "not 15 s" use FAST, which leaves room for a loaded CI box.
INIT_FETCH_TIMEOUT = 15.0
FAST = 7.0


def is_ads(flavour: str) -> bool:
    return FLAVOURS[flavour][1] is XdsTransport.ADS


# -- the topology ---------------------------------------------------------------------------------
@dataclass
class SeqLab:
    """Backends on loopback and the topology file the test rewrites.

    Services: web-a (HTTP backend "A", EDS), tcp-x (TCP backend t1), tcp-y (TCP backend t2).
    Proxy `ingress`: listener tcp-in (127.0.0.1:tcp_port) and listener http-in (127.0.0.1:http_port,
    route / -> web-a). A service appears in the proxy's snapshot only while a listener uses it.
    """

    path: Path
    web_a: HttpBackend
    tcp_1: TcpBackend
    tcp_2: TcpBackend
    tcp_port: int
    http_port: int

    def write(self, *, http: bool = True, tcp: bool = True, tcp_service: str = "tcp-x",
              web_timeout: str = "1s", web_lb: str = "round_robin") -> None:
        listeners = []
        if tcp:
            listeners.append(f"      - {{name: tcp-in, address: '127.0.0.1:{self.tcp_port}', protocol: tcp, "
                             f"service: {tcp_service}}}")
        if http:
            listeners.append(f"      - {{name: http-in, address: '127.0.0.1:{self.http_port}', protocol: http, "
                             "routes: [{prefix: /, service: web-a}]}")
        body = "\n".join(listeners)
        text = f"""apiVersion: keepsrc/v1
services:
  web-a: {{endpoints: ["127.0.0.1:{self.web_a.port}"], connect_timeout: {web_timeout}, lb: {web_lb}}}
  tcp-x: {{endpoints: ["127.0.0.1:{self.tcp_1.port}"]}}
  tcp-y: {{endpoints: ["127.0.0.1:{self.tcp_2.port}"]}}
proxies:
  ingress:
    listeners:
{body}
"""
        # Atomic, as an editor saves: the server never reads half a file.
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.path)


@contextlib.contextmanager
def seq_lab(directory: Path) -> Iterator[SeqLab]:
    backends = (HttpBackend(name="A"), TcpBackend(name="t1"), TcpBackend(name="t2"))
    try:
        lab = SeqLab(directory / "topology.yaml", *backends, free_port(), free_port())  # type: ignore[arg-type]
        lab.write()
        yield lab
    finally:
        for backend in backends:
            backend.close()


# -- the server -----------------------------------------------------------------------------------
class XdsServerThread:
    """The server with hot reload, on its own event loop in a thread, so tests can read its state.

    `address` is 'host:port' or 'unix:/path'; default: a free loopback port. Start a second one on
    the same address after the first exited to play a restarted server."""

    def __init__(self, source: Path | Store, address: str | None = None, debounce_ms: int = 100) -> None:
        self.cache = SnapshotCache()
        self.source = TopologySource(self.cache, source)
        self.address = address or f"127.0.0.1:{free_port()}"
        self._debounce_ms = debounce_ms
        self._started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._server: XdsServer | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def target(self) -> str:
        """For grpc clients (`keepsrc status --xds`)."""
        return self.address

    def __enter__(self) -> XdsServerThread:
        # A file loads before anything is served; a shared store loads once the server watches it.
        if isinstance(self.source.store, LocalStore):
            assert self.source.load(), "the topology file does not load"
        self._thread.start()
        assert self._started.wait(10), f"the xDS server did not start: {self._error!r}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # surfaced by __enter__ when it happens at start
            self._error = exc
        finally:
            # Streams the stop cut off: let them finish before the loop goes (no "Task was destroyed").
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()

            async def finish() -> None:
                await asyncio.gather(*pending, return_exceptions=True)
            self._loop.run_until_complete(finish())
            # Not closed: gRPC's poller may still call into this loop, and a closed one logs errors.

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._server = await start(self.cache, self.address)
        self._started.set()
        try:
            await self.source.watch(self._stop, debounce_ms=self._debounce_ms)
        finally:
            await self._server.stop(0.5)
            await self.source.store.close()


def envoy_for(workdir: Path, xds: int | PurePosixPath, flavour: str, node: str = "ingress",
              netns: str | None = None) -> Envoy:
    """An Envoy whose bootstrap points at the server on loopback port `xds`, or unix socket `xds`."""
    api, transport = FLAVOURS[flavour]
    address = xds if isinstance(xds, PurePosixPath) else SocketAddress("127.0.0.1", xds)
    config = to_dict(xds_bootstrap(node, address, SocketAddress("127.0.0.1", 0), api, transport))
    return Envoy(config, workdir, name=f"envoy-{node}", netns=netns)


# -- CSDS -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TypeState:
    status: str  # SYNCED, STALE, NOT_SENT, ERROR
    client: str  # ACKED, NACKED, REQUESTED
    version: str
    error: str = ""


def csds(target: str) -> dict[str, dict[str, TypeState]]:
    """node id -> type URL -> what the server's CSDS says (what `keepsrc status` prints)."""
    out: dict[str, dict[str, TypeState]] = {}
    for config in fetch(target).config:
        out[config.node.id] = {
            xds.type_url: TypeState(
                csds_pb2.ConfigStatus.Name(xds.config_status),
                config_dump_shared_pb2.ClientResourceStatus.Name(xds.client_status),
                xds.version_info,
                xds.error_state.details if xds.HasField("error_state") else "",
            )
            for xds in config.generic_xds_configs
        }
    return out


def csds_or_empty(target: str) -> dict[str, dict[str, TypeState]]:
    try:
        return csds(target)
    except grpc.RpcError:
        return {}


# -- Envoy state ----------------------------------------------------------------------------------
def _dump(envoy: Envoy, kind: str, query: str = "") -> dict[str, Any]:
    for config in json.loads(envoy.admin("/config_dump" + query))["configs"]:
        if config["@type"].endswith("." + kind):
            return dict(config)
    return {}


def listeners(envoy: Envoy) -> dict[str, dict[str, Any]]:
    """Dynamic listener name -> its config_dump entry (keys active_state, warming_state, draining_state,
    error_state). Envoy 1.40 also lists a rejected update as an entry with no name: skipped."""
    entries = _dump(envoy, "ListenersConfigDump").get("dynamic_listeners", [])
    return {entry["name"]: entry for entry in entries if "name" in entry}


def active_listener(envoy: Envoy, name: str) -> dict[str, Any] | None:
    """The active Listener body, if `name` is active and not also warming a replacement."""
    entry = listeners(envoy).get(name)
    if entry is None or "active_state" not in entry or "warming_state" in entry:
        return None
    return dict(entry["active_state"]["listener"])


def clusters(envoy: Envoy) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(active, warming): dynamic cluster name -> Cluster body."""
    dump = _dump(envoy, "ClustersConfigDump")
    active = {c["cluster"]["name"]: c["cluster"] for c in dump.get("dynamic_active_clusters", [])}
    warming = {c["cluster"]["name"]: c["cluster"] for c in dump.get("dynamic_warming_clusters", [])}
    return active, warming


def route_configs(envoy: Envoy) -> set[str]:
    return {r["route_config"]["name"] for r in _dump(envoy, "RoutesConfigDump").get("dynamic_route_configs", [])}


def hcm_stat_prefix(listener: dict[str, Any]) -> str:
    """The HTTP connection manager's stat_prefix in a config_dump Listener body."""
    for chain in listener.get("filter_chains", []):
        for f in chain.get("filters", []):
            if f.get("typed_config", {}).get("@type", "").endswith("HttpConnectionManager"):
                return str(f["typed_config"]["stat_prefix"])
    raise KeyError(f"listener {listener.get('name')} has no HTTP connection manager")


def stat0(envoy: Envoy, name: str) -> int:
    """A counter or gauge; an absent one (never created) is 0."""
    return envoy.stat(name) or 0


# -- traffic --------------------------------------------------------------------------------------
def http_backend(port: int, path: str = "/", timeout: float = 3) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        return str(json.loads(response.read())["backend"])


def tcp_backend(port: int, timeout: float = 3) -> str:
    return tcp_first_word(port, timeout)


@dataclass
class Traffic:
    """Calls `probe` back to back in a thread; every exception or unexpected answer is a failure."""

    probe: Callable[[], str]
    accept: Callable[[str], bool]
    interval: float = 0.02
    answers: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self.probe()
            except Exception as exc:  # every kind of failure counts
                self.failures.append(f"{time.strftime('%H:%M:%S')} {exc!r}")
            else:
                self.answers.append(answer)
                if not self.accept(answer):
                    self.failures.append(f"{time.strftime('%H:%M:%S')} unexpected answer {answer!r}")
            time.sleep(self.interval)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)
