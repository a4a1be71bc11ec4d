"""Sequences of changes that an xDS server must get right with a real Envoy 1.40 (issue 10).

Each test drives the keepsrc server through a sequence (an edit, a removal and re-addition, a
partial NACK, a restart of the server, the richest golden topology) and checks both what the
Envoy holds (/config_dump, its stats, CSDS on the server) and real traffic through it.

"Not the 15 s warming" is proven as a behaviour, never timed: a wait shorter than Envoy's
initial_fetch_timeout (FAST, with headroom for a loaded CI machine), doubled by the stat Envoy
counts when that timeout fires (`cluster.<name>.init_fetch_timeout`, `...rds.<name>.init_fetch_timeout`).
"""

from __future__ import annotations

import contextlib
import datetime
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pytest
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from keepsrc.snapshots.builder import pack
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SHORT_NAMES, Resource, Snapshot
from tests.support.envoy import Envoy, envoy_path, free_port
from tests.support.envoy_lab import (
    ADS_FLAVOURS,
    ALL,
    DELTA_FLAVOURS,
    FAST,
    FLAVOURS,
    INIT_FETCH_TIMEOUT,
    SeqLab,
    Traffic,
    TypeState,
    XdsServerThread,
    active_listener,
    clusters,
    csds,
    csds_or_empty,
    envoy_for,
    hcm_stat_prefix,
    http_backend,
    is_ads,
    listeners,
    route_configs,
    seq_lab,
    stat0,
    tcp_backend,
)
from tests.support.netns import Lab, NetNs
from tests.support.netns import netlab_fixture as netlab_fixture  # the `netlab` fixture

ROOT = Path(__file__).resolve().parent.parent
FEATURES = ROOT / "tests" / "golden" / "in" / "features.yaml"
NODE = "ingress"
assert FAST < INIT_FETCH_TIMEOUT / 2


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[SeqLab]:
    envoy_path()  # skip (or fail under KEEPSRC_STRICT=1) before starting anything
    with seq_lab(tmp_path) as lab:
        yield lab


# -- shared checks --------------------------------------------------------------------------------
def synced(target: str, node: str = NODE, types: tuple[str, ...] = ALL) -> bool:
    """CSDS says SYNCED (ACKed what was last sent, no NACK) for each of `types`."""
    state = csds_or_empty(target).get(node, {})
    return all(t in state and state[t].status == "SYNCED" for t in types)


def wait_synced(envoy: Envoy, target: str, flavour: str, what: str, timeout: float = 20.0,
                types: tuple[str, ...] | None = None) -> None:
    """Wait until CSDS says SYNCED for every type of the node; on timeout name what it said."""
    wanted = types or node_types(flavour)
    try:
        envoy.wait_until(lambda: synced(target, types=wanted), timeout=timeout, what=what)
    except TimeoutError:
        state = csds_or_empty(target).get(NODE, {})
        said = {SHORT_NAMES[t]: f"{s.status} {s.client} {s.version} {s.error}".strip() for t, s in state.items()}
        raise AssertionError(f"{what}: CSDS never said SYNCED for {[SHORT_NAMES[t] for t in wanted]}; "
                             f"it says {said}") from None


def xds_connected(envoy: Envoy) -> bool:
    """Envoy has a connection to the xDS server (per-type Envoys have no control_plane.* stats)."""
    return stat0(envoy, "cluster.keepsrc_xds.upstream_cx_active") > 0


def node_types(flavour: str) -> tuple[str, ...]:
    """Types whose CSDS status is one stream's: without ADS, Envoy has an EDS stream per cluster,
    each with its own sent/ACKed subset, so the node's EDS line is whichever answered last."""
    return ALL if is_ads(flavour) else (CLUSTER, LISTENER, ROUTE)


def web_a_active(envoy: Envoy, connect_timeout: str, lb: str | None = None) -> bool:
    """web-a is active with this connect_timeout (and lb_policy), and no cluster is warming."""
    active, warming = clusters(envoy)
    cluster = active.get("web-a")
    if cluster is None or warming or stat0(envoy, "cluster_manager.warming_clusters"):
        return False
    return cluster.get("connect_timeout") == connect_timeout and (lb is None or cluster.get("lb_policy") == lb)


def assert_no_init_fetch_timeout(envoy: Envoy, *stats: str) -> None:
    fired = {name: stat0(envoy, name) for name in stats}
    assert not any(fired.values()), (
        f"Envoy waited out initial_fetch_timeout ({INIT_FETCH_TIMEOUT:.0f} s) for a resource the server "
        f"should have sent: {fired}"
    )


def converge(server: XdsServerThread, envoy: Envoy, flavour: str, lab: SeqLab, tcp: str = "backend:t1") -> None:
    envoy.wait_ready()
    wait_synced(envoy, server.target, flavour, "every type SYNCED in CSDS")
    envoy.wait_until(lambda: http_backend(lab.http_port) == "A", what="HTTP traffic through http-in")
    envoy.wait_until(lambda: tcp_backend(lab.tcp_port) == tcp, what="TCP traffic through tcp-in")


# -- 1. a cluster edit re-warms the cluster: the server must send its endpoints again --------------
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_cluster_edit_without_endpoint_change_activates_without_init_fetch_timeout(
        flavour: str, lab: SeqLab, tmp_path: Path) -> None:
    with XdsServerThread(lab.path) as server, envoy_for(tmp_path, server.port, flavour) as envoy:
        converge(server, envoy, flavour, lab)
        assert web_a_active(envoy, "1s")

        # connect_timeout: Envoy replaces the cluster, which warms until a ClusterLoadAssignment
        # arrives; its endpoints did not change, so only a server that re-sends EDS gets it out.
        with Traffic(lambda: http_backend(lab.http_port), lambda answer: answer == "A") as traffic:
            lab.write(web_timeout="250ms")
            envoy.wait_until(lambda: web_a_active(envoy, "0.250s"), timeout=FAST,
                             what="web-a with connect_timeout 0.250s active, nothing warming (the server "
                                  "must re-send web-a's endpoints after the CDS update, else Envoy waits "
                                  f"{INIT_FETCH_TIMEOUT:.0f} s)")
            assert_no_init_fetch_timeout(envoy, "cluster.web-a.init_fetch_timeout")

            # The same for lb (another field that changes the cluster, not its endpoints).
            lab.write(web_timeout="250ms", web_lb="least_request")
            envoy.wait_until(lambda: web_a_active(envoy, "0.250s", "LEAST_REQUEST"), timeout=FAST,
                             what="web-a with lb LEAST_REQUEST active, nothing warming")
            assert_no_init_fetch_timeout(envoy, "cluster.web-a.init_fetch_timeout")
            wait_synced(envoy, server.target, flavour, "every type SYNCED after the edits", FAST)
        # The old cluster served while the new one warmed: no request failed at any point.
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.answers, "no request went through during the edits"
        assert http_backend(lab.http_port) == "A"
        assert stat0(envoy, "cluster_manager.cds.update_rejected") == 0


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_reconnect_to_a_server_whose_topology_moved_on(flavour: str, lab: SeqLab, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    with XdsServerThread(lab.path, address) as first, envoy_for(tmp_path, first.port, flavour) as envoy:
        converge(first, envoy, flavour, lab)
        first.__exit__(None, None, None)
        envoy.wait_until(lambda: not xds_connected(envoy), what="Envoy saw the server go")

        lab.write(web_timeout="250ms")  # the topology moves on while Envoy is away
        with XdsServerThread(lab.path, address) as second:
            # Reconnecting takes Envoy's backoff (not under test); the new CDS arriving starts the clock.
            envoy.wait_until(lambda: "0.250s" in {c.get("connect_timeout") for c in
                                                  (clusters(envoy)[0] | clusters(envoy)[1]).values()},
                             timeout=40, what="the edited web-a from the new server")
            envoy.wait_until(lambda: web_a_active(envoy, "0.250s"), timeout=FAST,
                             what="the edited web-a active after the reconnect, nothing warming (the server "
                                  "must send web-a's endpoints again after CDS)")
            assert_no_init_fetch_timeout(envoy, "cluster.web-a.init_fetch_timeout")
            wait_synced(envoy, second.target, flavour, "every type SYNCED on the new server", FAST)
            assert http_backend(lab.http_port) == "A"
            assert tcp_backend(lab.tcp_port) == "backend:t1"


# -- 2. remove the only HTTP listener, let it drain, put it back ------------------------------------
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_http_listener_removed_drained_and_re_added(flavour: str, lab: SeqLab, tmp_path: Path) -> None:
    with XdsServerThread(lab.path) as server, envoy_for(tmp_path, server.port, flavour) as envoy:
        converge(server, envoy, flavour, lab)
        assert "http-in" in route_configs(envoy)

        lab.write(http=False)
        envoy.wait_until(lambda: "http-in" not in listeners(envoy), what="http-in removed (and drained)")
        envoy.wait_until(lambda: stat0(envoy, "listener_manager.total_listeners_draining") == 0,
                         what="no listener draining (Envoy runs with --drain-time-s 1)")
        # Once drained, the listener's RDS subscription goes: Envoy unsubscribes http-in.
        envoy.wait_until(lambda: "http-in" not in route_configs(envoy), what="route config http-in released")
        wait_synced(envoy, server.target, flavour, "every type SYNCED after the removal")
        time.sleep(1)  # the unsubscribe reaches the server
        assert tcp_backend(lab.tcp_port) == "backend:t1"

        lab.write()
        envoy.wait_until(lambda: active_listener(envoy, "http-in") is not None
                         and stat0(envoy, "listener_manager.total_listeners_warming") == 0, timeout=FAST,
                         what="http-in active again, no listener warming (the server must send route "
                              "config http-in to the re-subscribing Envoy)")
        envoy.wait_until(lambda: http_backend(lab.http_port) == "A", timeout=FAST,
                         what="HTTP through the re-added http-in reaching backend A (a 404 means Envoy has "
                              "the listener but not its routes)")
        assert "http-in" in route_configs(envoy)
        assert_no_init_fetch_timeout(envoy, "http.http-in.rds.http-in.init_fetch_timeout",
                                     "cluster.web-a.init_fetch_timeout")
        wait_synced(envoy, server.target, flavour, "every type SYNCED after the re-addition", FAST)
        assert tcp_backend(lab.tcp_port) == "backend:t1"


# -- 3. delta: one response, one listener accepted and one rejected ---------------------------------
def _bad_listener(good: Resource) -> Resource:
    """tcp-in without a cluster: valid protobuf, refused by Envoy's own validation."""
    listener = listener_pb2.Listener.FromString(good.body)
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix="tcp-in")  # no cluster: Envoy's PGV check refuses it
    listener.ClearField("filter_chains")
    listener.filter_chains.append(listener_components_pb2.FilterChain(filters=[
        listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy", typed_config=pack(proxy))
    ]))
    return Resource.of(good.name, LISTENER, listener)


def _restat_http_listener(good: Resource, stat_prefix: str) -> Resource:
    """http-in, valid, with another stat_prefix on its HTTP connection manager."""
    listener = listener_pb2.Listener.FromString(good.body)
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            if network_filter.typed_config.Is(HttpConnectionManager.DESCRIPTOR):
                hcm = HttpConnectionManager.FromString(network_filter.typed_config.value)
                hcm.stat_prefix = stat_prefix
                network_filter.typed_config.Pack(hcm, deterministic=True)
    return Resource.of(good.name, LISTENER, listener)


def _listener_state(target: str) -> TypeState | None:
    return csds_or_empty(target).get(NODE, {}).get(LISTENER)


def _http_in_prefix(envoy: Envoy) -> str | None:
    listener = active_listener(envoy, "http-in")
    return hcm_stat_prefix(listener) if listener else None


@pytest.mark.parametrize("flavour", DELTA_FLAVOURS)
def test_delta_partial_nack_then_revert(flavour: str, lab: SeqLab, tmp_path: Path) -> None:
    with XdsServerThread(lab.path) as server, envoy_for(tmp_path, server.port, flavour) as envoy:
        converge(server, envoy, flavour, lab)
        s0 = server.cache.get(NODE)
        assert s0 is not None
        assert _http_in_prefix(envoy) == "http-in"

        # S1: http-in changed validly, tcp-in broken, in one delta LDS response.
        s1 = Snapshot.from_resources([
            _bad_listener(r) if (r.type_url, r.name) == (LISTENER, "tcp-in")
            else _restat_http_listener(r, "http-in-modified") if (r.type_url, r.name) == (LISTENER, "http-in")
            else r
            for t in ALL for r in s0.of_type(t).values()
        ])
        server.cache.set(NODE, s1)
        envoy.wait_until(lambda: (_listener_state(server.target) or TypeState("", "", "")).status == "ERROR",
                         what="the NACK of S1 in CSDS")
        state = _listener_state(server.target)
        assert state is not None and "tcp-in" in state.error, state
        # Envoy applied the good half of the response and rejected the other.
        envoy.wait_until(lambda: _http_in_prefix(envoy) == "http-in-modified", what="http-in' applied")
        assert http_backend(lab.http_port) == "A"  # through http-in'
        assert tcp_backend(lab.tcp_port) == "backend:t1"  # the old tcp-in, kept

        # Envoy holds neither S0 nor S1: the status must not say SYNCED for listeners.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            state = _listener_state(server.target)
            assert state is not None and state.status != "SYNCED", \
                f"CSDS says listeners SYNCED while Envoy holds the partly rejected S1: {state}"
            time.sleep(0.1)
        # The server cannot tell from the NACK which half Envoy refused; it may send each resource of
        # the rejected response again, alone, once (docs/xds.md), but never the refused one in a loop.
        rejected = stat0(envoy, "listener_manager.lds.update_rejected")
        assert 1 <= rejected <= 2, f"Envoy rejected {rejected} LDS updates: tcp-in was re-sent again and again"

        # Back to S0: the server must send http-in again (Envoy holds http-in', not S0's http-in).
        server.cache.set(NODE, s0)
        lies: list[TypeState] = []
        deadline = time.monotonic() + FAST
        while time.monotonic() < deadline:
            before = _http_in_prefix(envoy)
            state = _listener_state(server.target)
            after = _http_in_prefix(envoy)
            if after == "http-in":
                break
            if before == after == "http-in-modified" and state is not None and state.status == "SYNCED":
                lies.append(state)
            time.sleep(0.1)
        assert lies == [], (
            "CSDS says listeners SYNCED while Envoy still holds http-in' from the partly rejected S1 "
            f"(the server believes the NACK undid the whole response): {lies[0]}"
        )
        assert _http_in_prefix(envoy) == "http-in", (
            "after reverting to S0 Envoy still holds http-in' (stat_prefix http-in-modified): the server "
            "did not re-send http-in, which Envoy had accepted from the partly rejected response"
        )
        wait_synced(envoy, server.target, flavour, "every type SYNCED, no NACK, once Envoy holds S0", FAST)
        assert all(state.error == "" for state in csds(server.target)[NODE].values())
        assert server.cache.status[NODE].of(LISTENER).nack is None
        assert stat0(envoy, "listener_manager.lds.update_rejected") == rejected, "S0 was rejected?"
        assert http_backend(lab.http_port) == "A"
        assert tcp_backend(lab.tcp_port) == "backend:t1"


# -- 4. reconnect to a restarted server with the same topology, then a make-before-break change ------
UPDATE_COUNTERS = (
    "cluster_manager.cds.update_success", "listener_manager.lds.update_success",
    "http.http-in.rds.http-in.update_success", "cluster.web-a.update_success", "cluster.tcp-x.update_success",
    "listener_manager.listener_modified", "listener_manager.listener_in_place_updated",
    "listener_manager.listener_added", "cluster_manager.cluster_modified", "cluster_manager.cluster_added",
)


def _config_events(envoy: Envoy, since: datetime.datetime) -> list[str]:
    """Envoy's own account (info log) of CDS removals and LDS updates logged since `since`, in order.

    By timestamp, not file offset: Envoy writes its log file in bursts, so an offset taken before
    a change may still be followed by older lines."""
    text = envoy.log_path.read_text(errors="replace") if envoy.log_path.exists() else ""
    events = []
    for line in text.splitlines():
        if not line.startswith("[") or datetime.datetime.fromisoformat(line[1:24]) < since:
            continue
        if "cds: added/updated" in line:
            removed = int(line.rsplit("removed ", 1)[1].split()[0])
            if removed:
                events.append(f"cds removed {removed}")
        elif "lds: add/update listener" in line:
            events.append("lds update " + line.rsplit("listener ", 1)[1].strip("'"))
    return events


@contextlib.contextmanager
def _restarted_server(lab: SeqLab, flavour: str,
                      workdir: Path) -> Iterator[tuple[XdsServerThread, Envoy, dict[str, int]]]:
    """An Envoy converged on a server that then stops; a new server with the same topology on the
    same address, to which the Envoy has reconnected and reported what it holds. Yields the new
    server, the Envoy and its update counters from before the restart."""
    address = f"127.0.0.1:{free_port()}"
    with XdsServerThread(lab.path, address) as first, envoy_for(workdir, first.port, flavour) as envoy:
        converge(first, envoy, flavour, lab)
        counters = {name: stat0(envoy, name) for name in UPDATE_COUNTERS}
        first.__exit__(None, None, None)
        envoy.wait_until(lambda: not xds_connected(envoy), what="Envoy saw the server go")
        with XdsServerThread(lab.path, address) as second:
            envoy.wait_until(lambda: xds_connected(envoy), timeout=40, what="Envoy reconnected")
            envoy.wait_until(lambda: NODE in csds_or_empty(second.target)
                             and set(csds(second.target)[NODE]) == set(ALL), what="every type reported again")
            time.sleep(1)  # room for anything the new server might (wrongly) send
            yield second, envoy, counters


@pytest.mark.parametrize("flavour", ADS_FLAVOURS)
def test_reconnect_with_the_same_topology_is_synced_and_applies_nothing(
        flavour: str, lab: SeqLab, tmp_path: Path) -> None:
    with _restarted_server(lab, flavour, tmp_path) as (server, envoy, counters):
        status = subprocess.run([sys.executable, "-m", "keepsrc", "status", "--xds", server.target],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert status.returncode == 0, status.stdout + status.stderr
        for type_url in ALL:
            line = next((x for x in status.stdout.splitlines() if x.split()[:1] == [SHORT_NAMES[type_url]]), "")
            assert "SYNCED   ACKED" in line, (
                f"after an Envoy reconnected reporting the versions it holds, {SHORT_NAMES[type_url]} must be "
                f"SYNCED (the server has nothing newer); `keepsrc status` says:\n{status.stdout}"
            )
        assert {name: stat0(envoy, name) for name in UPDATE_COUNTERS} == counters, \
            "the new server re-sent something Envoy already held"
        assert http_backend(lab.http_port) == "A"
        assert tcp_backend(lab.tcp_port) == "backend:t1"


@pytest.mark.parametrize("flavour", ADS_FLAVOURS)
def test_change_after_reconnect_keeps_make_before_break(flavour: str, lab: SeqLab, tmp_path: Path) -> None:
    with _restarted_server(lab, flavour, tmp_path) as (server, envoy, _):
        # Move tcp-in from tcp-x to tcp-y: cluster tcp-x may go only after tcp-in stopped using it.
        since = datetime.datetime.now()
        ok = ("backend:t1", "backend:t2")
        with Traffic(lambda: tcp_backend(lab.tcp_port), lambda answer: answer in ok, interval=0.01) as traffic:
            lab.write(tcp_service="tcp-y")
            envoy.wait_until(lambda: tcp_backend(lab.tcp_port) == "backend:t2", what="tcp-in moved to tcp-y")
            envoy.wait_until(lambda: "tcp-x" not in clusters(envoy)[0], what="cluster tcp-x removed")
            time.sleep(0.5)
        # Envoy flushes its log file every few seconds: wait for both events to be written.
        envoy.wait_until(lambda: "lds update tcp-in" in _config_events(envoy, since)
                         and any(e.startswith("cds removed") for e in _config_events(envoy, since)),
                         what="Envoy's log of the listener update and the cluster removal")
        events = _config_events(envoy, since)
        first_removal = next(i for i, e in enumerate(events) if e.startswith("cds removed"))
        assert events.index("lds update tcp-in") < first_removal, (
            f"Envoy removed cluster tcp-x before listener tcp-in stopped using it: {events} (after a "
            "reconnect the server must still know what Envoy holds, and hold the removal back until the "
            "listener update is ACKed)"
        )
        assert traffic.failures == [], traffic.failures[:5]
        assert "backend:t2" in traffic.answers
        assert http_backend(lab.http_port) == "A"
        wait_synced(envoy, server.target, flavour, "every type SYNCED after the move", FAST)


# -- 5. the richest golden topology, every flavour, both proxies, each Envoy in its own namespace ----
CLIENT = r"""
import json, socket, sys, urllib.request
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "http":
    request = urllib.request.Request(f"http://{host}:{port}{sys.argv[4]}", headers={"X-Forwarded-For": sys.argv[5]})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            print(response.status, json.loads(response.read())["backend"])
    except urllib.error.HTTPError as exc:
        print(exc.code, "-")
else:
    payload = sys.argv[4].encode().decode("unicode_escape").encode()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(3)
        if len(sys.argv) > 5:
            conn.bind((sys.argv[5], 0))
        conn.connect((host, port))
        conn.sendall(payload)
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    print(reply.decode().strip())
"""

# node -> (namespace addresses on lo, backends: (kind, address, name))
FEATURE_HOSTS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str, str], ...]]] = {
    "edge": (("198.18.0.1/32",), (
        ("http", "127.0.0.4:80", "hashed-4"), ("http", "127.0.0.6:80", "hashed-6"), ("http", "127.0.0.5:80", "random"),
        ("tcp", "127.0.0.2:8443", "dns"), ("tcp", "127.0.0.3:9000", "pp-v1-4"), ("tcp", "[::1]:9000", "pp-v1-6"),
    )),
    "gateway": (("198.18.2.2/32",), (
        ("tcp", "127.0.0.4:80", "hashed-4"), ("tcp", "127.0.0.6:80", "hashed-6"), ("udp", "127.0.0.7:5060", "sip"),
    )),
}


def _client(ns: NetNs, *args: str) -> str:
    result = ns.run(sys.executable, "-c", CLIENT, *args, check=False, timeout=15)
    if result.returncode != 0:
        raise OSError(f"client {args} in {ns.name}: {result.stderr.strip().splitlines()[-1:]}")
    return result.stdout.strip()


def _wait(envoy: Envoy, ns: NetNs, args: tuple[str, ...], check: Callable[[str], bool], what: str) -> str:
    answers: list[str] = []

    def probe() -> bool:
        answers.append(_client(ns, *args))
        return check(answers[-1])
    envoy.wait_until(probe, timeout=30, what=f"{what} (last answer: {answers[-1:]})")
    return answers[-1]


def _feature_traffic(node: str, ns: NetNs, envoy: Envoy) -> None:
    if node == "edge":
        # web (HTTP, 127.0.0.1:8080): RBAC on the client X-Forwarded-For names behind 2 trusted hops.
        hops = "198.18.1.1, 198.18.1.2"
        _wait(envoy, ns, ("http", "127.0.0.1", "8080", "/", f"198.18.0.20, {hops}"),
              lambda a: a == "200 random", "web: / -> random")
        _wait(envoy, ns, ("http", "127.0.0.1", "8080", "/api/x", f"198.18.0.20, {hops}"),
              lambda a: a in ("200 hashed-4", "200 hashed-6"), "web: /api -> hashed")
        assert _client(ns, "http", "127.0.0.1", "8080", "/", f"198.18.0.10, {hops}") == "403 -", "deny_from"
        # tls-passthrough ([::]:8443, optional PROXY v2): no header, plain bytes, to 127.0.0.2:8443
        # (the other endpoint, backend.example.internal, does not resolve in the namespace).
        _wait(envoy, ns, ("tcp", "::1", "8443", "hello\\n"), lambda a: a.startswith("backend:dns "),
              "tls-passthrough -> dns-backend")
        # sip-tcp (0.0.0.0:5060): PROXY v1 in, from an allowed direct peer; PROXY v1 out to pp-v1.
        answer = _wait(envoy, ns, ("tcp", "198.18.0.1", "5060", "PROXY TCP4 198.18.0.50 198.18.0.1 40000 5060\\r\\n"
                                   "hello\\n", "198.18.0.1"),
                       lambda a: a.startswith("backend:pp-v1-"), "sip-tcp -> pp-v1")
        assert "client:198.18.0.50" in answer, answer
    else:
        # transparent (198.18.2.2:7000): original_src, the backend sees the client's own address.
        answer = _wait(envoy, ns, ("tcp", "198.18.2.2", "7000", "hello\\n"),
                       lambda a: a.startswith("backend:hashed-"), "transparent -> hashed")
        assert "client:198.18.2.2" in answer, answer
        # sip-udp (198.18.2.2:5060): udp_proxy to the SIP server, which answers OPTIONS.
        envoy.wait_until(lambda: ns.run(sys.executable, "-m", "keepsrc.demo.backends", "sip-options",
                                        "198.18.2.2:5060", "--timeout", "3", check=False,
                                        timeout=15).stdout.startswith("SIP/2.0 200"),
                         timeout=30, what="sip-udp: a SIP OPTIONS answered through udp_proxy")


@contextlib.contextmanager
def _short_dir() -> Iterator[Path]:
    # A unix socket path holds 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="ks-xds-") as directory:
        yield Path(directory)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_features_golden_topology_in_every_flavour(flavour: str, netlab: Lab, tmp_path: Path) -> None:
    envoy_path()
    with _short_dir() as short, XdsServerThread(FEATURES, f"unix:{short}/xds.sock") as server:
        envoys: dict[str, tuple[NetNs, Envoy]] = {}
        with contextlib.ExitStack() as stack:
            for node, (addresses, backends) in FEATURE_HOSTS.items():
                ns = netlab.ns(node)
                for address in addresses:
                    ns.run("ip", "addr", "add", address, "dev", "lo")
                for kind, address, name in backends:
                    ns.popen([sys.executable, "-m", "keepsrc.demo.backends", kind, address, "--name", name],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
                workdir = tmp_path / node
                workdir.mkdir()
                envoy = envoy_for(workdir, PurePosixPath(f"{short}/xds.sock"), flavour, node=node, netns=ns.name)
                envoys[node] = (ns, stack.enter_context(envoy))

            for node, (ns, envoy) in envoys.items():
                snapshot = server.cache.get(node)
                assert snapshot is not None
                expected = set(snapshot.of_type(LISTENER))
                envoy.wait_ready(timeout=30)
                envoy.wait_until(lambda envoy=envoy, expected=expected: {
                    name for name in listeners(envoy) if active_listener(envoy, name) is not None} == expected,
                    timeout=30, what=f"{node}: every listener of features.yaml active")
                types = tuple(t for t in node_types(flavour) if snapshot.of_type(t))

                def acked(node: str = node, types: tuple[str, ...] = types) -> bool:
                    status = server.cache.status.get(node)  # read only: TypeStatus.of() would add a type
                    return status is not None and all(
                        t in status.types and status.types[t].nack is None and status.types[t].acked
                        and status.types[t].acked == status.types[t].sent for t in types)
                envoy.wait_until(acked, timeout=30, what=f"{node}: every type ACKed, no NACK")
                nacks = {SHORT_NAMES[t]: s.nack for t, s in server.cache.status[node].types.items() if s.nack}
                assert nacks == {}, nacks
                assert stat0(envoy, "listener_manager.lds.update_rejected") == 0
                assert stat0(envoy, "cluster_manager.cds.update_rejected") == 0
                assert stat0(envoy, "listener_manager.total_listeners_warming") == 0
                _feature_traffic(node, ns, envoy)

            status = subprocess.run([sys.executable, "-m", "keepsrc", "status", "--xds", server.target],
                                    capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert status.returncode == 0, status.stdout + status.stderr
            assert "edge (cluster edge)" in status.stdout and "gateway (cluster gateway)" in status.stdout
            assert "NACKED" not in status.stdout and "ERROR" not in status.stdout, status.stdout
            for node in envoys:
                state = csds(server.target)[node]
                for type_url in node_types(flavour):
                    if type_url in state:
                        assert state[type_url].status == "SYNCED", (node, SHORT_NAMES[type_url], state[type_url])
            assert ENDPOINT in csds(server.target)["edge"]
            assert ROUTE in csds(server.target)["edge"]
