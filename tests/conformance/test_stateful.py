"""A stateful randomized test of the xDS server: random topology edits, reconnects, NACKs and
restarts against one in-process server and 1-3 Envoy-like clients (SotW and delta, over ADS).

Hypothesis (`hypothesis.stateful`) drives `XdsMachine`: each rule is one step (a topology edit or
a burst of them, a client disconnecting and reconnecting with what it holds, a client starting or
stopping to NACK responses that carry a named listener/cluster/route, a server restart with the
same snapshots). After every step the test waits until everything has *settled* (`settle()`: every
client connected, every response answered, nothing moving for a while; a timeout fails loudly,
with what each client holds) and checks:

1. every client holds exactly the current snapshot's resources for what it subscribes to (names
   and bytes); where it rejected something, the server's status records a NACK for that type, and
   differences elsewhere are only what a standing NACK legitimately holds back (removals, and
   updates the server reports as waiting);
2. at *every* response a client applies (checked inside the client, in order): no listener refers
   to a cluster the client does not hold (tcp_proxy `cluster`; HTTP via the RouteConfiguration the
   listener names), and no route or endpoints are removed while something held still uses them;
3. CSDS (`keepsrc.server.csds.client_status`) tells the truth: SYNCED for a type only if the client
   holds the current snapshot for it and no rejection stands; ERROR iff a rejection of content the
   snapshot still holds stands; SYNCED once settled with nothing rejected.

Runs are derandomized (the same sequences every run, no example database), 30 sequences of up to 12
steps, about 25 s on 2 cores. On a failure Hypothesis prints the sequence of steps (`state =
XdsMachine()`, `state.start(...)`, `state.edit(...)`, ...): shrunk to a shortest one locally (can
take minutes), as found under CI=true. Reproduce with `pytest tests/conformance/test_stateful.py -q
-x`, or replay the printed lines by hand in a script that sets `XdsMachine.loop_thread = LoopThread()`
(each line is a method of XdsMachine; add `print(state.describe())` to see what each client holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import grpc
from envoy.config.listener.v3.listener_pb2 import Listener as ListenerProto
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
)
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy
from envoy.service.status.v3 import csds_pb2
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

from keepsrc.server import SnapshotCache, XdsServer, start
from keepsrc.server.csds import client_status
from keepsrc.snapshots.builder import build_snapshots
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SHORT_NAMES, Snapshot
from keepsrc.topology import (
    LbPolicy,
    Listener,
    Protocol,
    Proxy,
    ProxyProtocolVersion,
    Route,
    Service,
    SocketAddress,
    Topology,
)
from tests.support.xds_client import WILDCARD, XdsClient

T = TypeVar("T")
PROXY = "edge"  # the proxy entry; clients are node ids envoy-N of node.cluster "edge"
TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
SERVICES = ("s0", "s1", "s2", "s3", "s4")
LISTENERS = ("l0", "l1", "l2", "l3")
SETTLE_TIMEOUT = 5.0
MAX_EXAMPLES, STEPS = 30, 12  # about 25 s on 2 cores when nothing fails
STEP_TIMEOUT = 30.0


# -- the topology, as plain data Hypothesis can generate and shrink ------------------------------
@dataclass(frozen=True)
class ServiceSpec:
    ports: tuple[int, ...] = (1,)  # endpoints 127.0.1.N:9000+N
    connect_timeout_ms: int = 1000
    lb: LbPolicy = LbPolicy.ROUND_ROBIN
    send_proxy_protocol: ProxyProtocolVersion | None = None


@dataclass(frozen=True)
class ListenerSpec:
    http: bool
    services: tuple[str, ...]  # tcp: one; http: one per route


@dataclass
class Model:
    services: dict[str, ServiceSpec] = field(default_factory=dict)
    listeners: dict[str, ListenerSpec] = field(default_factory=dict)

    def snapshot(self) -> Snapshot:
        listeners = []
        for name, spec in sorted(self.listeners.items()):
            address = SocketAddress("127.0.0.1", 10000 + LISTENERS.index(name))
            if spec.http:
                routes = tuple(Route("/" if i == 0 else f"/r{i}", s) for i, s in enumerate(spec.services))
                listeners.append(Listener(name, address, Protocol.HTTP, routes=routes))
            else:
                listeners.append(Listener(name, address, Protocol.TCP, service=spec.services[0]))
        services = {
            name: Service(name, tuple(SocketAddress(f"127.0.1.{p}", 9000 + p) for p in spec.ports),
                          connect_timeout_ms=spec.connect_timeout_ms, lb=spec.lb,
                          send_proxy_protocol=spec.send_proxy_protocol)
            for name, spec in self.services.items()
        }
        return build_snapshots(Topology(services, {PROXY: Proxy(PROXY, tuple(listeners))}))[PROXY]

    def repoint(self, old: str, new: str | None) -> None:
        """Listeners using service `old` use `new` instead (None: routes to it go, listeners left
        with nothing go)."""
        for name, spec in list(self.listeners.items()):
            services = tuple(dict.fromkeys(new if s == old else s for s in spec.services if s != old or new))
            if not services:
                del self.listeners[name]
            elif services != spec.services:
                self.listeners[name] = replace(spec, services=services)


@dataclass(frozen=True)
class Edit:
    """One topology edit; an edit that does not apply (unknown name) does nothing."""

    op: str
    service: str = ""
    listener: str = ""
    other: str = ""  # rename target, second route's service
    ports: tuple[int, ...] = ()
    http: bool = False
    timeout: int = 1000
    lb: LbPolicy = LbPolicy.ROUND_ROBIN
    pp: ProxyProtocolVersion | None = None

    def apply(self, model: Model) -> None:
        services, listeners = model.services, model.listeners
        if self.op == "add_service":
            if self.service not in services:
                services[self.service] = ServiceSpec(self.ports)
            if self.listener in listeners:  # and something uses it
                spec = listeners[self.listener]
                listeners[self.listener] = replace(spec, services=(self.service, *spec.services[1:]))
        elif self.op == "remove_service" and self.service in services:
            del services[self.service]
            model.repoint(self.service, next((s for s in sorted(services)), None))
        elif self.op == "rename_service" and self.service in services and self.other not in services:
            services[self.other] = services.pop(self.service)
            model.repoint(self.service, self.other)
        elif self.op == "add_listener" and self.listener not in listeners and self.service in services:
            used = (self.service, self.other) if self.http and self.other in services else (self.service,)
            listeners[self.listener] = ListenerSpec(self.http, tuple(dict.fromkeys(used)))
        elif self.op == "remove_listener":
            listeners.pop(self.listener, None)
        elif self.op == "move_listener" and self.listener in listeners and self.service in services:
            spec = listeners[self.listener]
            listeners[self.listener] = replace(spec, services=tuple(dict.fromkeys((self.service, *spec.services[1:]))))
        elif self.op == "endpoints" and self.service in services:
            services[self.service] = replace(services[self.service], ports=self.ports)
        elif self.op == "cluster" and self.service in services:
            services[self.service] = replace(services[self.service], connect_timeout_ms=self.timeout, lb=self.lb,
                                             send_proxy_protocol=self.pp)


service_names = st.sampled_from(SERVICES)
listener_names = st.sampled_from(LISTENERS)
ports = st.lists(st.integers(1, 4), min_size=1, max_size=3, unique=True).map(lambda p: tuple(sorted(p)))
edits = st.one_of(
    st.builds(Edit, st.just("add_service"), service_names, listener=listener_names, ports=ports),
    st.builds(Edit, st.just("remove_service"), service_names),
    st.builds(Edit, st.just("rename_service"), service_names, other=service_names),
    st.builds(Edit, st.just("add_listener"), service_names, listener=listener_names, http=st.booleans(),
              other=service_names),
    st.builds(Edit, st.just("remove_listener"), listener=listener_names),
    st.builds(Edit, st.just("move_listener"), service_names, listener=listener_names),
    st.builds(Edit, st.just("endpoints"), service_names, ports=ports),
    st.builds(Edit, st.just("cluster"), service_names, timeout=st.sampled_from([250, 1000, 2500]),
              lb=st.sampled_from([LbPolicy.ROUND_ROBIN, LbPolicy.LEAST_REQUEST, LbPolicy.RING_HASH]),
              pp=st.sampled_from([None, ProxyProtocolVersion.V1, ProxyProtocolVersion.V2])),
)


# -- what a client's resources refer to -----------------------------------------------------------
def listener_uses(listener: ListenerProto) -> tuple[set[str], set[str]]:
    """(clusters its tcp_proxy filters name, route configurations its HTTP connection managers name)."""
    clusters: set[str] = set()
    routes: set[str] = set()
    for chain in listener.filter_chains:
        for f in chain.filters:
            if f.typed_config.Is(TcpProxy.DESCRIPTOR):
                clusters.add(TcpProxy.FromString(f.typed_config.value).cluster)
            elif f.typed_config.Is(HttpConnectionManager.DESCRIPTOR):
                hcm = HttpConnectionManager.FromString(f.typed_config.value)
                if hcm.HasField("rds"):
                    routes.add(hcm.rds.route_config_name)
                else:
                    clusters.update(route_uses(hcm.route_config))
    return clusters, routes


def route_uses(config: RouteConfiguration) -> set[str]:
    return {r.route.cluster for vh in config.virtual_hosts for r in vh.routes if r.route.cluster}


def body(message: object) -> bytes:
    return message.SerializeToString(deterministic=True)  # type: ignore[attr-defined]


def short(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url)


# -- one Envoy-like client, across its reconnects -------------------------------------------------
class Slot:
    """A client identity (node id) and what the test knows about it: what it refuses, what it
    refused, and every make-before-break violation seen inside it."""

    def __init__(self, index: int, delta: bool) -> None:
        self.node_id = f"envoy-{index}"
        self.delta = delta
        self.client: XdsClient | None = None
        self.channel: grpc.aio.Channel | None = None
        self.task: asyncio.Task[None] | None = None
        self.poison: set[tuple[str, str]] = set()  # (type, name): NACK any response carrying it
        # delta: name -> the content of it last refused (dropped once that name is accepted)
        self.refused: dict[str, dict[str, bytes]] = {t: {} for t in TYPES}
        # SotW: type -> (refused?, content) of the last response: a response is a whole state
        self.last: dict[str, tuple[bool, dict[str, bytes]]] = {}
        self.violations: list[str] = []

    @property
    def connected(self) -> bool:
        return self.client is not None

    def __repr__(self) -> str:
        return f"{self.node_id}({'delta' if self.delta else 'sotw'})"

    def reject(self, type_url: str, resources: dict[str, object]) -> str | None:
        hits = sorted(n for n in resources if (type_url, n) in self.poison)
        return f"test refuses {short(type_url)} {', '.join(hits)}" if hits else None

    def on_response(self, client: XdsClient, type_url: str, incoming: dict[str, object],
                    removed: tuple[str, ...], error: str | None) -> None:
        self.last[type_url] = (error is not None, {n: body(m) for n, m in incoming.items()})
        refused = self.refused[type_url]
        for name, message in incoming.items():
            if error is None:
                refused.pop(name, None)
            else:
                refused[name] = body(message)
        if error is not None:
            return  # nothing applied
        problems = []
        clusters, routes = client.held[CLUSTER], client.held[ROUTE]
        for name, listener in sorted(client.held[LISTENER].items()):
            used, route_names = listener_uses(listener)  # type: ignore[arg-type]
            for route_name in sorted(route_names):
                if route_name in removed and type_url == ROUTE:
                    problems.append(f"route {route_name} removed while listener {name} uses it")
                if route_name in routes:
                    used |= {f"{c} (via route {route_name})" if c not in clusters else c
                             for c in route_uses(routes[route_name])}  # type: ignore[arg-type]
            missing = sorted(c for c in used if c not in clusters)
            if missing:
                problems.append(f"listener {name} uses cluster(s) {', '.join(missing)} the client does not hold")
        if type_url == ENDPOINT:
            problems.extend(f"endpoints of {n} removed while cluster {n} is held" for n in removed if n in clusters)
        if problems:
            self.violations.append(
                f"{self!r} after applying {short(type_url)} response [{', '.join(sorted(incoming))}]"
                f"{' removed ' + str(list(removed)) if removed else ''}: {'; '.join(problems)}; "
                f"holds clusters {sorted(clusters)}, listeners {sorted(client.held[LISTENER])}, "
                f"routes {sorted(routes)}")


# -- the machine ------------------------------------------------------------------------------------
class LoopThread:
    """An asyncio loop on a background thread: server and clients run on it between steps too."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="xds-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = STEP_TIMEOUT) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise AssertionError(f"a step did not finish in {timeout} s") from None

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(drain(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class XdsMachine(RuleBasedStateMachine):
    loop_thread: LoopThread  # set by the test before running

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.cache = SnapshotCache()
        self.server: XdsServer | None = None
        self.port = 0
        self.slots: list[Slot] = []
        self.restarts = 0

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = STEP_TIMEOUT) -> T:
        return self.loop_thread.run(coro, timeout)

    # -- setup and teardown --------------------------------------------------------------------
    @initialize(deltas=st.lists(st.booleans(), min_size=1, max_size=3))
    def start(self, deltas: list[bool]) -> None:
        self.model.services = {"s0": ServiceSpec((1,)), "s1": ServiceSpec((2,))}
        self.model.listeners = {"l0": ListenerSpec(False, ("s0",)), "l1": ListenerSpec(True, ("s1",))}
        self.slots = [Slot(i, delta) for i, delta in enumerate(deltas)]

        async def go() -> None:
            self.cache.set(PROXY, self.model.snapshot())
            self.server = await start(self.cache, "127.0.0.1:0")
            self.port = self.server.port
            for slot in self.slots:
                await self._connect(slot, carry=False)
        self.run(go())
        self.settle_and_check()

    def teardown(self) -> None:
        async def stop() -> None:
            for slot in self.slots:
                await self._disconnect(slot)
            if self.server is not None:
                await self.server.stop(None)
        with contextlib.suppress(Exception):
            self.run(stop(), 15)

    async def _connect(self, slot: Slot, carry: bool) -> None:
        previous = slot.client if carry else None
        # A connection of its own, as an Envoy has: gRPC would otherwise share one subchannel among
        # channels to the same address, and a new stream could land on the connection a restarted
        # server just closed.
        slot.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}",
                                                 options=[("grpc.use_local_subchannel_pool", 1)])
        client = XdsClient(slot.channel, slot.node_id, PROXY, delta=slot.delta, reject=slot.reject,
                           on_response=slot.on_response)
        if previous is not None:
            client.carry_over(previous)
        slot.client = client
        slot.task = asyncio.get_running_loop().create_task(client.run())

    async def _disconnect(self, slot: Slot) -> None:
        """Cancel the stream (the client keeps what it holds in `slot.client` for a reconnect)."""
        if slot.task is not None:
            if slot.client is not None:
                slot.client.cancel()
            slot.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await slot.task
            slot.task = None
        if slot.channel is not None:
            await slot.channel.close()
            slot.channel = None

    # -- rules -------------------------------------------------------------------------------------
    def _set(self) -> None:
        self.cache.set(PROXY, self.model.snapshot())

    @rule(edit=edits)
    def edit(self, edit: Edit) -> None:
        edit.apply(self.model)

        async def go() -> None:
            self._set()
        self.run(go())
        self.settle_and_check()

    @rule(burst=st.lists(st.tuples(edits, st.sampled_from([0.0, 0.002, 0.01])), min_size=2, max_size=4))
    def edit_burst(self, burst: list[tuple[Edit, float]]) -> None:
        """Edits back to back: snapshots change while responses are in flight."""
        async def go() -> None:
            for edit, pause in burst:
                edit.apply(self.model)
                self._set()
                await asyncio.sleep(pause)
        self.run(go())
        self.settle_and_check()

    @rule(index=st.integers(0, 2), edit=st.none() | edits, pause=st.sampled_from([0.0, 0.005, 0.02]),
          edits_while_away=st.lists(edits, max_size=2))
    def reconnect(self, index: int, edit: Edit | None, pause: float, edits_while_away: list[Edit]) -> None:
        """Disconnect a client (right after an edit: mid-sequence) and reconnect it with what it holds."""
        slot = self.slots[index % len(self.slots)]

        async def go() -> None:
            if edit is not None:
                edit.apply(self.model)
                self._set()
                await asyncio.sleep(pause)
            await self._disconnect(slot)
            for away in edits_while_away:
                away.apply(self.model)
                self._set()
            await self._connect(slot, carry=True)
        self.run(go())
        self.settle_and_check()

    @rule(index=st.integers(0, 2), type_url=st.sampled_from([LISTENER, CLUSTER, ROUTE]),
          name=st.sampled_from(SERVICES + LISTENERS), edit=st.none() | edits)
    def start_rejecting(self, index: int, type_url: str, name: str, edit: Edit | None) -> None:
        """From now on the client NACKs every response of `type_url` that carries `name`."""
        slot = self.slots[index % len(self.slots)]

        async def go() -> None:
            slot.poison.add((type_url, name))
            if edit is not None:
                edit.apply(self.model)
                self._set()
        self.run(go())
        self.settle_and_check()

    @precondition(lambda self: any(slot.poison for slot in self.slots))
    @rule(index=st.integers(0, 2), edit=st.none() | edits)
    def stop_rejecting(self, index: int, edit: Edit | None) -> None:
        slot = self.slots[index % len(self.slots)]

        async def go() -> None:
            slot.poison.clear()
            if edit is not None:
                edit.apply(self.model)
                self._set()
        self.run(go())
        self.settle_and_check()

    @rule()
    def restart_server(self) -> None:
        """A new server process: a fresh cache with the same snapshot; every client reconnects."""
        async def go() -> None:
            assert self.server is not None
            await self.server.stop(None)
            for slot in self.slots:
                await self._disconnect(slot)
            self.cache = SnapshotCache()
            self._set()
            try:
                self.server = await start(self.cache, f"127.0.0.1:{self.port}")
            except OSError:
                self.server = await start(self.cache, "127.0.0.1:0")
                self.port = self.server.port
            for slot in self.slots:
                await self._connect(slot, carry=True)
        self.restarts += 1
        self.run(go())
        self.settle_and_check()

    # -- settling and the invariants -------------------------------------------------------------
    def settle_and_check(self) -> None:
        problems = self.run(self._settle_and_check())
        assert not problems, "\n".join(problems)

    async def _settle_and_check(self) -> list[str]:
        await self.settle()
        problems = [v for slot in self.slots for v in slot.violations]
        for slot in self.slots:
            slot.violations.clear()
        return problems + self.check()

    def _state(self) -> tuple[bool, str, object]:
        """(settled as far as one look tells, why not, a fingerprint of everything that moves)."""
        fingerprint: list[object] = []
        why = ""
        for slot in self.slots:
            client = slot.client
            assert client is not None and slot.task is not None
            if slot.task.done():
                exc = None if slot.task.cancelled() else slot.task.exception()
                raise AssertionError(f"{slot!r}: the stream ended: {exc!r}")
            status = self.cache.status.get(slot.node_id)
            fingerprint.append(len(client.history))
            if status is None or status.streams != 1:
                why = why or f"{slot!r}: server has {status and status.streams} streams for it"
                continue
            for type_url in TYPES:
                if type_url not in WILDCARD and type_url not in client.subscribed:
                    continue
                ts = status.types.get(type_url)
                if ts is None:
                    why = why or f"{slot!r}: no {short(type_url)} status yet"
                    continue
                fingerprint.append((ts.sent, ts.acked, ts.nack, ts.waiting, ts.responses))
                # `waiting` (an update held back) does not count: with every response answered, a
                # held-back update will never go out by itself, and check() judges whether it may wait.
                answered = ts.sent == ts.acked or (ts.nack is not None and ts.nack.version == ts.sent)
                if not answered:
                    why = why or f"{slot!r}: {short(type_url)} unanswered"
        return not why, why, fingerprint

    async def settle(self, timeout: float = SETTLE_TIMEOUT, quiet: int = 3, every: float = 0.02) -> None:
        """Wait until every client is connected and identified, every response the server sent is
        answered (ACK or NACK), and nothing (responses received, server status) moved for `quiet`
        looks in a row; fail loudly after `timeout` seconds, with what each client holds."""
        deadline = time.monotonic() + timeout
        previous: object = None
        stable = 0
        while True:
            ready, why, fingerprint = self._state()
            stable = stable + 1 if ready and fingerprint == previous else 0
            if stable >= quiet:
                return
            previous = fingerprint
            if time.monotonic() > deadline:
                raise AssertionError(f"not settled after {timeout} s: {why or 'still changing'}\n{self.describe()}")
            await asyncio.sleep(every)

    def describe(self) -> str:
        lines = []
        snapshot = self.cache.get(PROXY)
        for slot in self.slots:
            client = slot.client
            assert client is not None
            status = self.cache.status.get(slot.node_id)
            lines.append(f"{slot!r} poison={sorted(slot.poison)}")
            for type_url in TYPES:
                current = sorted(snapshot.of_type(type_url)) if snapshot else []
                ts = status.types.get(type_url) if status else None
                lines.append(f"  {short(type_url):9} holds {sorted(client.held[type_url])} current {current} "
                             f"status {ts}")
            lines.append("  last responses: " + "; ".join(
                f"{short(r.type_url)} {list(r.names)}{' -' + str(list(r.removed)) if r.removed else ''}"
                f"{' NACK' if r.nacked else ''}" for r in client.history[-8:]))
        return "\n".join(lines)

    def check(self) -> list[str]:
        snapshot = self.cache.get(PROXY)
        assert snapshot is not None
        csds = {c.node.id: {x.type_url: x.config_status for x in c.generic_xds_configs}
                for c in client_status(self.cache).config}
        problems: list[str] = []
        for slot in self.slots:
            problems.extend(self._check_slot(slot, snapshot, csds.get(slot.node_id, {})))
        if problems:
            problems.append(self.describe())
        return problems

    @staticmethod
    def _rejection_stands(slot: Slot, type_url: str, current: dict[str, bytes], holds_current: bool) -> bool:
        """Whether the client refused content the snapshot still holds and holds something else.
        Delta: a resource refused at its current content and not held at it. SotW: each response
        is a whole state: the last one was refused and it carried all of the current content (and
        maybe resources the server kept for make-before-break)."""
        held = slot.client.held[type_url] if slot.client is not None else {}
        if slot.delta:
            return any(current.get(n) == refused and (n not in held or body(held[n]) != refused)
                       for n, refused in slot.refused[type_url].items())
        refused, content = slot.last.get(type_url, (False, {}))
        return refused and not holds_current and all(content.get(n) == b for n, b in current.items())

    def _check_slot(self, slot: Slot, snapshot: Snapshot, csds: dict[str, int]) -> Iterable[str]:
        client = slot.client
        status = self.cache.status.get(slot.node_id)
        assert client is not None and status is not None
        any_nack = any(ts.nack is not None for ts in status.types.values())
        for type_url in TYPES:
            current = snapshot.of_type(type_url)
            held = client.held[type_url]
            name = f"{slot!r} {short(type_url)}"
            wildcard = type_url in WILDCARD
            wanted = set(current) if wildcard else client.subscribed.get(type_url, set()) & set(current)
            wrong = sorted(n for n in wanted if n not in held or body(held[n]) != current[n].body)
            stale = sorted(set(held) - set(current))
            holds_current = not wrong and not (wildcard and stale)
            stands = self._rejection_stands(slot, type_url, {n: current[n].body for n in wanted}, holds_current)
            ts = status.types.get(type_url)
            nack = ts.nack if ts is not None else None
            shown = csds.get(type_url)
            shown_name = csds_pb2.ConfigStatus.Name(shown) if shown is not None else "absent"
            # 1. the client holds the current snapshot, or a NACK explains why not: its own, or
            # another type's that holds this update back (the server then says it waits: STALE)
            held_back = any_nack and ts is not None and ts.waiting
            if wrong and nack is None and not held_back:
                yield (f"{name}: lacks or holds old {wrong} with no NACK recorded for the type"
                       f"{' (the server holds the update back: waiting)' if ts is not None and ts.waiting else ''}")
            if stale and not any_nack:
                yield f"{name}: still holds {stale}, gone from the snapshot, with no NACK standing"
            if stands and nack is None:
                yield f"{name}: refuses the current content but the server records no NACK"
            # 3. CSDS tells the truth
            if shown == csds_pb2.SYNCED and not holds_current:
                yield f"{name}: CSDS says SYNCED but the client lacks {wrong} / still holds {stale}"
            if shown == csds_pb2.SYNCED and stands:
                yield f"{name}: CSDS says SYNCED but a rejection of current content stands"
            if (shown == csds_pb2.ERROR) != stands:
                yield (f"{name}: CSDS says {shown_name} but a rejection of current content "
                       f"{'stands' if stands else 'does not stand'} (server NACK: {nack})")
            if not any_nack and holds_current and wanted and shown != csds_pb2.SYNCED:
                yield f"{name}: settled, holds the current snapshot, nothing rejected, but CSDS says {shown_name}"


# Shrinking a failure replays hundreds of sequences (minutes): done locally, where the shortest
# sequence is wanted; CI reports the sequence as found and stays within its minute.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate) if os.environ.get("CI") else tuple(Phase)


def test_xds_server_converges_under_random_steps() -> None:
    loop_thread = LoopThread()
    XdsMachine.loop_thread = loop_thread
    try:
        run_state_machine_as_test(XdsMachine, settings=settings(
            max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=True, database=None,
            phases=PHASES, suppress_health_check=[HealthCheck.too_slow], print_blob=False,
            report_multiple_bugs=False))
    finally:
        loop_thread.close()
