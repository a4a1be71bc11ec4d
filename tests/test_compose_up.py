"""docker-compose.yml for real: `docker-compose --profile <scenario> up` of every scenario, traffic from
the client container, what the backend saw, and a teardown that leaves nothing behind.

No Docker engine runs on the CI machine: podman serves the Docker API that docker-compose drives
(`podman system service` on a unix socket this module starts and stops), configured by
scripts/setup-podman. The images come from scripts/build-standin-images: the official Envoy,
HAProxy, nginx and Python images where a pull works, else local stand-ins under the same names
(labelled io.keepsrc.standin=true), kept in podman's storage between runs. keepsrc's own image is
built from Dockerfile by docker-compose (deploy/compose/podman.yml: with the host's network).

Per scenario the backend must report the client, 198.18.0.10, and each negative path (no PROXY
protocol, a forged X-Forwarded-For, the TCP peer behind a proxy) the proxy's address; every Envoy's
xDS connection must be TLS (keepsrc-certs' certificates), and plaintext to keepsrc refused. Before and
after the module: the same containers, networks, volumes, links and iptables rules; the chains netavark
creates and never removes (NETAVARK_*) are removed here when they were not there before.

The profile `replicas` (etcd, `keepsrc push`, two `keepsrc serve --store etcd://...` and an Envoy listing
both) has its own test: traffic through the Envoy, SIGKILL of the replica it is on with no failed request
while it moves to the other, and a push of a changed topology that reaches it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.strict import require, require_binary, require_root

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
PODMAN_BUILD = ROOT / "deploy/compose/podman.yml"
SETUP_PODMAN = ROOT / "scripts/setup-podman"
STANDINS = ROOT / "scripts/build-standin-images"
DROPIN = Path("/etc/containers/containers.conf.d/keepsrc.conf")
# Listed explicitly: the profiles this test brings up. Another profile in docker-compose.yml (for
# example `replicas`) is not a scenario of the talk and is checked by its own tests.
SCENARIOS = ("inner-http", "external-http", "inner-tcp", "external-tcp")
PROJECT = "keepsrc-compose-test"  # not the directory's name, so a developer's own `up` is left alone
CLIENT = "198.18.0.10"
HAPROXY = "198.18.1.2"
FORGED = "198.18.9.9"
READY_WITHIN = 90.0  # seconds for the Envoys to get their config over xDS and carry traffic
REPLICAS = "replicas"  # the profile test_compose_up_replicas brings up


# -- host state: what must be the same before and after ---------------------------------------------
def _run(
    argv: list[str], timeout: float = 60, check: bool = False,
    cwd: Path | None = None, env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def _iptables_save(binary: str) -> dict[str, list[str]]:
    """Table -> its chain declarations (policy, no counters) and rules, in order."""
    if not shutil.which(binary):
        return {}
    tables: dict[str, list[str]] = {}
    table = ""
    for line in _run([binary]).stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
            tables[table] = []
        elif line.startswith(":"):
            tables[table].append(re.sub(r"\s*\[\d+:\d+\]$", "", line))
        elif line.startswith("-A "):
            tables[table].append(line)
    return {name: lines for name, lines in tables.items() if lines}


@dataclass(frozen=True)
class HostState:
    containers: frozenset[str]
    networks: frozenset[str]
    volumes: frozenset[str]
    links: frozenset[str]
    iptables: tuple[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]], ...]

    @classmethod
    def read(cls, podman: str) -> HostState:
        containers = _run([podman, "ps", "-a", "--format", "{{.Names}}"], check=True).stdout.split()
        networks = _run([podman, "network", "ls", "--format", "{{.Name}}"], check=True).stdout.split()
        volumes = _run([podman, "volume", "ls", "--format", "{{.Name}}"], check=True).stdout.split()
        links = [line.split(":")[1].strip().split("@")[0] for line in _run(["ip", "-o", "link"]).stdout.splitlines()]
        iptables = tuple(
            (binary, tuple((table, tuple(lines)) for table, lines in sorted(_iptables_save(binary).items())))
            for binary in ("iptables-save", "ip6tables-save")
        )
        return cls(frozenset(containers), frozenset(networks), frozenset(volumes), frozenset(links), iptables)

    def differences(self, after: HostState) -> list[str]:
        found = []
        for field in ("containers", "networks", "volumes", "links"):
            added = getattr(after, field) - getattr(self, field)
            if added:
                found.append(f"{field} left behind: {sorted(added)}")
        before_rules = {(b, t, line) for b, tables in self.iptables for t, lines in tables for line in lines}
        after_rules = {(b, t, line) for b, tables in after.iptables for t, lines in tables for line in lines}
        found += [f"{b} -t {t}: left behind: {line}" for b, t, line in sorted(after_rules - before_rules)]
        found += [f"{b} -t {t}: gone: {line}" for b, t, line in sorted(before_rules - after_rules)]
        return found


def _remove_netavark_chains(before: HostState) -> None:
    """Remove what netavark added to iptables and keeps after its last network is gone.

    netavark 1.4 leaves NETAVARK_FORWARD, NETAVARK_ISOLATION_* (with rules naming the removed
    bridge) and the NETAVARK-HOSTPORT-* chains, with the jumps to them from the built-in chains.
    Only rules and chains that were not there before and that name a NETAVARK chain are touched.
    """
    for binary, tables in before.iptables:
        command = binary.removesuffix("-save")
        known = {(t, line) for t, lines in tables for line in lines}
        for table, lines in _iptables_save(binary).items():
            new_chains = [
                line[1:].split()[0] for line in lines
                if line.startswith(":NETAVARK") and (table, line) not in known
            ]
            for line in lines:
                if line.startswith("-A ") and "NETAVARK" in line and (table, line) not in known:
                    chain = line.split()[1]
                    if chain not in new_chains:
                        _run([command, "-t", table, "-D", *shlex.split(line)[1:]])
            for chain in new_chains:
                _run([command, "-t", table, "-F", chain])
            for chain in new_chains:
                _run([command, "-t", table, "-X", chain])


def _processes(name: str) -> set[int]:
    result = _run(["pgrep", "-x", name])
    return {int(pid) for pid in result.stdout.split()}


# -- the engine: podman's Docker API on a socket of our own -------------------------------------------
@dataclass
class Engine:
    podman: str
    compose_binary: str
    env: dict[str, str]
    log: Path

    def compose(self, *args: str, profile: str | None = None, files: tuple[Path, ...] = (COMPOSE_FILE,),
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [self.compose_binary, "-p", PROJECT]
        for file in files:
            argv += ["-f", str(file)]
        if profile:
            argv += ["--profile", profile]
        argv += list(args)
        result = _run(argv, timeout=timeout, cwd=ROOT, env=self.env)
        with self.log.open("a") as log:
            log.write(f"$ {shlex.join(argv)}  -> {result.returncode}\n{result.stdout}{result.stderr}\n")
        return result

    def exec_client(self, profile: str, command: str) -> str:
        result = self.compose("exec", "-T", "client", "sh", "-c", command, profile=profile, timeout=30)
        return result.stdout if result.returncode == 0 else ""

    def container(self, profile: str, service: str) -> str:
        result = self.compose("ps", "-q", service, profile=profile)
        assert result.returncode == 0 and result.stdout.strip(), f"no container for {service}: {result.stderr}"
        return result.stdout.split()[0]

    def project_containers(self) -> list[str]:
        result = _run([self.podman, "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
                       "--format", "{{.Names}}"], check=True)
        return result.stdout.split()

    def down(self, profile: str) -> None:
        """Stop and remove the profile's containers, network and volume (keepsrc-certs' CA and certificates).

        podman refuses to remove a container whose network namespace others share (`network_mode:
        service:X`) while they exist, and docker-compose removes them all at once: so the sharers
        go first, and a second `down` removes whatever the first could not.
        """
        sharers = [name for name in self.services(profile) if _shares_netns(name)]
        if sharers:
            self.compose("rm", "--stop", "--force", *sharers, profile=profile)
        first = self.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", profile=profile)
        if first.returncode != 0:
            second = self.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", profile=profile)
            assert second.returncode == 0, f"docker-compose down failed twice:\n{first.stderr}\n{second.stderr}"

    def assert_nothing_left(self) -> None:
        """After `down`: no container, network or volume of the project remains."""
        assert self.project_containers() == [], "containers left after docker-compose down"
        networks = _run([self.podman, "network", "ls", "--format", "{{.Name}}"]).stdout.split()
        assert f"{PROJECT}_lab" not in networks, "the lab network is left after docker-compose down"
        volumes = _run([self.podman, "volume", "ls", "--format", "{{.Name}}"]).stdout.split()
        assert f"{PROJECT}_pki" not in volumes, "the certificates' volume is left after docker-compose down --volumes"

    def services(self, profile: str) -> list[str]:
        result = self.compose("config", "--services", profile=profile)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()


@functools.cache
def _compose_spec() -> dict[str, dict[str, object]]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def _shares_netns(service: str) -> bool:
    return str(_compose_spec().get(service, {}).get("network_mode", "")).startswith("service:")


def _sweep_an_earlier_run(podman: str) -> None:
    """A run killed before its teardown (SIGKILL, a lost machine) may have left its containers."""
    leftovers = _run([podman, "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
                      "--format", "{{.Names}}"], check=True).stdout.split()
    if leftovers:
        _run([podman, "rm", "--force", "--depend", *leftovers], timeout=120)
    if f"{PROJECT}_lab" in _run([podman, "network", "ls", "--format", "{{.Name}}"]).stdout.split():
        _run([podman, "network", "rm", "--force", f"{PROJECT}_lab"])
    if f"{PROJECT}_pki" in _run([podman, "volume", "ls", "--format", "{{.Name}}"]).stdout.split():
        _run([podman, "volume", "rm", "--force", f"{PROJECT}_pki"])


def _wait_for_socket(socket: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"podman system service exited {process.returncode}:\n{log.read_text()}")
        if socket.exists():
            return
        time.sleep(0.1)
    raise AssertionError(f"podman system service did not create {socket}:\n{log.read_text()}")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    require_root()
    podman = require_binary("podman")
    compose_binary = require_binary("docker-compose")
    require_binary("mmdebstrap")
    require_binary("runc")
    require(DROPIN.is_file(), f"{DROPIN} is missing: run scripts/setup-podman (scripts/setup does, as root)")
    # Idempotent: fixes a drop-in from an older version of the script.
    _run([str(SETUP_PODMAN)], check=True)

    _sweep_an_earlier_run(podman)
    workdir = tmp_path_factory.mktemp("podman")
    log = workdir / "compose.log"
    socket = workdir / "podman.sock"
    conmons, aardvarks = _processes("conmon"), _processes("aardvark-dns")
    before = HostState.read(podman)
    service_log = (workdir / "service.log").open("wb")
    service = subprocess.Popen(
        [podman, "system", "service", "--time=0", f"unix://{socket}"],
        stdout=service_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    env["DOCKER_HOST"] = f"unix://{socket}"
    engine = Engine(podman, compose_binary, env, log)
    problems: list[str] = []
    try:
        _wait_for_socket(socket, service, workdir / "service.log")
        # Official images where a pull works, stand-ins otherwise; cached in podman's storage.
        images = _run([str(STANDINS)], timeout=600)
        assert images.returncode == 0, f"scripts/build-standin-images failed:\n{images.stdout}{images.stderr}"
        built = engine.compose("build", "client", files=(COMPOSE_FILE, PODMAN_BUILD), timeout=600)
        assert built.returncode == 0, f"docker-compose build failed:\n{built.stdout[-3000:]}{built.stderr[-3000:]}"
        yield engine
    finally:
        for scenario in (*SCENARIOS, REPLICAS):  # a test that failed half-way still leaves nothing running
            with contextlib.suppress(Exception):
                if engine.project_containers():
                    engine.down(scenario)
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait(timeout=10)
        service_log.close()
        # conmon lingers exit_command_delay (2 s) after its container; aardvark-dns until the network goes.
        def lingering() -> set[int]:
            return (_processes("conmon") - conmons) | (_processes("aardvark-dns") - aardvarks)

        deadline = time.monotonic() + 20
        while lingering() and time.monotonic() < deadline:
            time.sleep(0.5)
        for name, earlier in (("conmon", conmons), ("aardvark-dns", aardvarks)):
            if _processes(name) - earlier:
                problems.append(f"{name} processes left running: {sorted(_processes(name) - earlier)}")
        _remove_netavark_chains(before)
        problems += before.differences(HostState.read(podman))
    if problems:
        pytest.fail("the host is not as before the compose tests:\n" + "\n".join(problems), pytrace=False)


# -- what each scenario must show ---------------------------------------------------------------------
def _json(text: str) -> dict[str, object] | None:
    with contextlib.suppress(ValueError):
        value = json.loads(text)
        return value if isinstance(value, dict) else None
    return None


def _xff_client(reply: dict[str, object], trusted: int = 1) -> str:
    """The client as app-b reads X-Forwarded-For, skipping the `trusted` proxies in front of it."""
    headers = reply.get("headers")
    assert isinstance(headers, dict), reply
    entries = [e.strip() for e in str(headers.get("x-forwarded-for", "")).split(",") if e.strip()]
    return entries[-1 - trusted] if len(entries) > trusted else f"no client in X-Forwarded-For {entries}"


def _http(engine: Engine, profile: str, url: str, *headers: str) -> dict[str, object] | None:
    flags = " ".join(f"-H {shlex.quote(h)}" for h in headers)
    return _json(engine.exec_client(profile, f"curl -s --max-time 5 {flags} {url}"))


def _tcp(engine: Engine, profile: str, address: str, line: str) -> str:
    host, port = address.split(":")
    # Without -N: a client that half-closes right after sending is reset by Envoy's listener filters.
    return engine.exec_client(profile, f"printf '{line}\\n' | nc -q 2 -w 5 {host} {port}").strip()


def _eventually(probe: Callable[[], object]) -> object:
    """Poll until the stack answers (the Envoys get their config over xDS after `up`)."""
    deadline = time.monotonic() + READY_WITHIN
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(1)


Row = tuple[str, str, str]  # what was tried, what the backend saw, what it must see


def check_inner_http(engine: Engine) -> list[Row]:
    p = "inner-http"
    reply = _eventually(lambda: _http(engine, p, "198.18.3.2:15001/"))
    assert isinstance(reply, dict), f"no JSON from app-b through A's Envoy 198.18.3.2:15001: {reply!r}"
    forged = _http(engine, p, "198.18.3.2:15001/", f"X-Forwarded-For: {FORGED}") or {"headers": {}}
    headers = reply["headers"]
    assert isinstance(headers, dict)
    return [
        ("client -> A -> B -> app-b: X-Forwarded-For", _xff_client(reply), CLIENT),
        ("  B's verdict: x-envoy-external-address", str(headers.get("x-envoy-external-address")), CLIENT),
        (f"  client forges X-Forwarded-For: {FORGED}", _xff_client(forged), CLIENT),
        ("  negative: app-b's TCP peer (B's Envoy)", str(reply.get("peer")), "127.0.0.1"),
    ]


def check_external_http(engine: Engine) -> list[Row]:
    p = "external-http"
    reply = _eventually(lambda: _http(engine, p, f"{HAPROXY}:8000/"))
    assert isinstance(reply, dict), f"no JSON from app-b through HAProxy {HAPROXY}:8000: {reply!r}"
    nginx = engine.exec_client(p, f"curl -s --max-time 5 {HAPROXY}:8081/").strip()
    plain = engine.exec_client(p, f"curl -s --max-time 5 {HAPROXY}:8082/").strip()
    return [
        ("client -> HAProxy (PROXY v2) -> ingress -> B -> app-b: X-Forwarded-For", _xff_client(reply), CLIENT),
        ("  negative: app-b's TCP peer (B's Envoy)", str(reply.get("peer")), "127.0.0.1"),
        ("client -> HAProxy (PROXY v2) -> nginx", nginx, f"nginx: proxy_protocol_addr={CLIENT} remote_addr={HAPROXY}"),
        ("  negative: HAProxy without PROXY protocol -> nginx", plain,
         f"nginx: proxy_protocol_addr= remote_addr={HAPROXY}"),
    ]


def check_inner_tcp(engine: Engine) -> list[Row]:
    seen = _eventually(lambda: _tcp(engine, "inner-tcp", "198.18.4.2:15006", "hello"))
    return [("client -> B (original_src) -> app-b", str(seen), f"backend:app-b client:{CLIENT} hello")]


def check_external_tcp(engine: Engine) -> list[Row]:
    seen = _eventually(lambda: _tcp(engine, "external-tcp", f"{HAPROXY}:9000", "hello"))
    return [("client -> HAProxy -> ingress -> B (original_src) -> app-b", str(seen),
             f"backend:app-b client:{CLIENT} hello")]


# Run in the client container (keepsrc's image): gRPC health in plaintext to keepsrc's xDS port.
PLAINTEXT_HEALTH = (
    "import grpc; from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc as rpc\n"
    "try:\n"
    "    print(pb.HealthCheckResponse.ServingStatus.Name(rpc.HealthStub(grpc.insecure_channel('{target}'))"
    ".Check(pb.HealthCheckRequest(), timeout=5).status))\n"
    "except grpc.RpcError as exc:\n"
    "    print(exc.code().name)\n"
)


def _envoys(profile: str) -> dict[str, str]:
    """The profile's Envoys: compose service -> lab address."""
    return {name: str(spec["networks"]["lab"]["ipv4_address"]) for name, spec in _compose_spec().items()  # type: ignore[index]
            if profile in spec.get("profiles", []) and str(spec.get("image", "")).startswith("envoyproxy/")}


# On a failure, what each Envoy did with its connections: PROXY protocol errors, rejected or reset
# connections, upstream connections, health checks and healthy hosts (an access log does not say).
FAILURE_STATS = "proxy_proto|downstream_cx_total|downstream_cx_destroy|upstream_cx_|health_check|membership"


def _envoy_stats(engine: Engine, profile: str) -> str:
    lines = []
    for name, ip in _envoys(profile).items():
        stats = engine.exec_client(profile, f"curl -sG --max-time 5 --data-urlencode 'filter={FAILURE_STATS}'"
                                            f" {ip}:9901/stats")
        nonzero = [line for line in stats.splitlines() if not line.endswith(": 0")]
        lines += [f"{name} ({ip}) stats, non-zero:", *(f"  {line}" for line in nonzero)]
    return "\n".join(lines)


def check_mutual_tls(engine: Engine, profile: str) -> list[Row]:
    """Every Envoy's xDS connection is TLS (its certificate from keepsrc-certs' volume); plaintext is refused."""
    envoys = list(_envoys(profile).values())

    def over_tls(ip: str) -> bool:
        wanted = "^(cluster.keepsrc_xds.ssl.handshake|control_plane.connected_state)$"
        stats = engine.exec_client(profile, f"curl -sG --max-time 5 --data-urlencode 'filter={wanted}' {ip}:9901/stats")
        values = dict(line.split(": ", 1) for line in stats.splitlines() if ": " in line)
        return int(values.get("cluster.keepsrc_xds.ssl.handshake", "0")) >= 1 and values.get(
            "control_plane.connected_state") == "1"

    tls = [ip for ip in envoys if over_tls(ip)]
    script = PLAINTEXT_HEALTH.format(target=f"keepsrc-{profile}:18000")
    plaintext = engine.exec_client(profile, f"python -c {shlex.quote(script)}").strip()
    return [
        ("xDS: Envoys connected to keepsrc over TLS", f"{len(tls)} of {len(envoys)}",
         f"{len(envoys)} of {len(envoys)}"),
        ("  negative: plaintext gRPC to keepsrc's xDS port", plaintext, "UNAVAILABLE"),
    ]


CHECKS: dict[str, Callable[[Engine], list[Row]]] = {
    "inner-http": check_inner_http,
    "external-http": check_external_http,
    "inner-tcp": check_inner_tcp,
    "external-tcp": check_external_tcp,
}


def _table(rows: list[Row]) -> str:
    width = max(len(row[0]) for row in rows)
    return "\n".join(f"{what:<{width}}  {seen!r:<50} {'PASS' if seen == want else 'FAIL, want ' + repr(want)}"
                     for what, seen, want in rows)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_compose_up_shows_the_client_address(engine: Engine, scenario: str) -> None:
    started = time.monotonic()
    up = engine.compose("up", "-d", profile=scenario, timeout=300)
    try:
        assert up.returncode == 0, f"docker-compose --profile {scenario} up -d failed:\n{up.stderr}"
        up_seconds = time.monotonic() - started
        rows = CHECKS[scenario](engine) + check_mutual_tls(engine, scenario)
        print(f"\n{scenario}: up -d in {up_seconds:.1f} s\n{_table(rows)}")
        if any(seen != want for _, seen, want in rows):
            logs = engine.compose("logs", "--no-color", "--tail", "40", profile=scenario).stdout
            stats = _envoy_stats(engine, scenario)
            pytest.fail(f"{scenario}: a backend saw the wrong address:\n{_table(rows)}\n\n{stats}\n\n{logs}",
                        pytrace=False)

        # keepsrc serves as the unprivileged user and its HEALTHCHECK says SERVING (podman runs a
        # HEALTHCHECK on demand: no systemd timer here).
        server = engine.container(scenario, f"keepsrc-{scenario}")
        assert engine.compose("exec", "-T", f"keepsrc-{scenario}", "id", "-u", profile=scenario).stdout.strip() != "0"
        health = _run([engine.podman, "healthcheck", "run", server])
        status = _run([engine.podman, "inspect", "--format", "{{.State.Health.Status}}", server]).stdout.strip()
        assert health.returncode == 0 and status == "healthy", f"HEALTHCHECK: {health.stdout}{health.stderr} {status}"
        # The one-shot netplan containers (root, NET_ADMIN) applied their plan and exited 0.
        for name in engine.services(scenario):
            if name.endswith(f"{scenario}-netplan-svc-b"):
                code = _run([engine.podman, "inspect", "--format", "{{.State.ExitCode}}",
                             engine.container(scenario, name)]).stdout.strip()
                assert code == "0", f"{name} exited {code}"
    finally:
        engine.down(scenario)
    engine.assert_nothing_left()


# -- the profile `replicas`: two `keepsrc serve --store etcd://...`, one Envoy listing both ------------
REPLICA_ENVOY = "198.18.2.2"
REPLICA_LISTENER = f"{REPLICA_ENVOY}:10000"
REPLICA_IPS = {"198.18.0.3": "keepsrc-replica-a", "198.18.0.4": "keepsrc-replica-b"}
XDS_CX_ACTIVE = re.compile(r"^keepsrc_xds::([\d.]+):18000::cx_active::(\d+)$", re.MULTILINE)

# Run in the client container: TCP requests through the Envoy, one after another, until /tmp/stop-traffic
# exists; the counts so far in /tmp/traffic.json after each, and at the end on stdout.
TRAFFIC = """
import json, os, socket
ok, failed, failures = 0, 0, []
while not os.path.exists('/tmp/stop-traffic'):
    try:
        with socket.create_connection(('{host}', {port}), timeout=3) as conn:
            conn.sendall(b'hello\\n')
            reply = b''
            while chunk := conn.recv(4096):
                reply += chunk
        answer = reply.decode() or 'empty reply'
    except OSError as exc:
        answer = f'error: {{exc}}'
    if answer.startswith('backend:'):
        ok += 1
    else:
        failed += 1
        failures = (failures + [answer])[-10:]
    with open('/tmp/traffic.tmp', 'w') as out:
        json.dump({{'ok': ok, 'failed': failed, 'failures': failures}}, out)
    os.replace('/tmp/traffic.tmp', '/tmp/traffic.json')
print(json.dumps({{'ok': ok, 'failed': failed, 'failures': failures}}))
"""


def _xds_replica(engine: Engine) -> str | None:
    """The replica the Envoy's xDS stream is on: the one host of its keepsrc_xds cluster with an active
    connection (its admin's /clusters), while it says it is connected."""
    clusters = engine.exec_client(REPLICAS, f"curl -s --max-time 5 {REPLICA_ENVOY}:9901/clusters")
    stats = engine.exec_client(REPLICAS, f"curl -s --max-time 5 '{REPLICA_ENVOY}:9901/stats?filter=connected_state'")
    on = [REPLICA_IPS.get(ip, ip) for ip, active in XDS_CX_ACTIVE.findall(clusters) if int(active) > 0]
    return on[0] if len(on) == 1 and "control_plane.connected_state: 1" in stats else None


def _traffic_so_far(engine: Engine) -> dict[str, object]:
    return _json(engine.exec_client(REPLICAS, "cat /tmp/traffic.json 2>/dev/null")) or {"ok": 0, "failed": 0}


def _count(counts: dict[str, object], key: str) -> int:
    value = counts.get(key, 0)
    return value if isinstance(value, int) else 0


def test_compose_up_replicas(engine: Engine) -> None:
    """etcd, `keepsrc push`, two replicas and an Envoy listing both: traffic through the Envoy; SIGKILL of
    the replica it is on fails no request and the Envoy moves to the other; a push reaches it."""
    p = REPLICAS
    up = engine.compose("up", "-d", profile=p, timeout=300)
    traffic: subprocess.Popen[str] | None = None
    try:
        assert up.returncode == 0, f"docker-compose --profile {p} up -d failed:\n{up.stderr}"
        first = _eventually(lambda: _tcp(engine, p, REPLICA_LISTENER, "hello"))
        rows: list[Row] = [("client -> Envoy (bootstrap lists replicas A and B) -> app-v1", str(first),
                            f"backend:app-v1 client:{CLIENT} hello")]
        for replica in REPLICA_IPS.values():  # both serve (HEALTHCHECK over TLS) as the unprivileged user
            container = engine.container(p, replica)
            _run([engine.podman, "healthcheck", "run", container])
            status = _run([engine.podman, "inspect", "--format", "{{.State.Health.Status}}", container]).stdout
            uid = engine.compose("exec", "-T", replica, "id", "-u", profile=p).stdout.strip()
            rows.append((f"  {replica}: HEALTHCHECK, uid", f"{status.strip()} {uid}", "healthy 10001"))
        on = _eventually(lambda: _xds_replica(engine))
        assert on in REPLICA_IPS.values(), f"the Envoy's xDS connection is on no replica: {on!r}"
        other = next(name for name in REPLICA_IPS.values() if name != on)

        # Requests one after another through the Envoy while its replica is killed and it moves.
        engine.exec_client(p, "rm -f /tmp/stop-traffic /tmp/traffic.json")
        script = TRAFFIC.format(host=REPLICA_ENVOY, port=REPLICA_LISTENER.split(":")[1])
        traffic = subprocess.Popen(
            [engine.compose_binary, "-p", PROJECT, "-f", str(COMPOSE_FILE), "--profile", p,
             "exec", "-T", "client", "python", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=engine.env,
        )
        _eventually(lambda: _count(_traffic_so_far(engine), "ok") >= 10)
        killed = engine.compose("kill", on, profile=p)
        assert killed.returncode == 0, f"docker-compose kill {on}: {killed.stderr}"
        moved = _eventually(lambda: _xds_replica(engine) == other)
        after_move = _count(_traffic_so_far(engine), "ok")
        _eventually(lambda: _count(_traffic_so_far(engine), "ok") >= after_move + 20)
        engine.exec_client(p, "touch /tmp/stop-traffic")
        out, err = traffic.communicate(timeout=60)
        counts = _json(out.strip().splitlines()[-1] if out.strip() else "") or {}
        total = _count(counts, "ok") + _count(counts, "failed")
        rows += [
            (f"  the Envoy's xDS replica, then SIGKILL of it ({on})", "moved to " + (other if moved else "none"),
             f"moved to {other}"),
            ("  failed requests through the Envoy, meanwhile", f"{_count(counts, 'failed')} of {total}",
             f"0 of {total}"),
        ]
        if counts.get("failures") or not counts:
            rows.append(("  what failed", f"{counts.get('failures')} {err[-500:]}", "[]"))

        # A changed topology pushed into etcd reaches the Envoy through the replica left. (Not with
        # `docker-compose run`: docker-compose 1.29 on podman's API wants the lab network recreated.)
        # Exit 2 is "etcd unreachable, try again": right after a container is killed, podman's DNS
        # (aardvark-dns) can fail a lookup for a moment, and a user would push again.
        for _attempt in range(10):
            pushed = engine.compose("exec", "-T", other, "keepsrc", "push", "/etc/keepsrc/replicas/topology-v2.yaml",
                                    "--store", "etcd://replicas-etcd:2379/keepsrc/replicas", profile=p)
            if pushed.returncode != 2:
                break
            time.sleep(1)
        rows.append((f"  keepsrc push topology-v2.yaml (docker-compose exec {other})",
                     "pushed" if pushed.returncode == 0 and " at revision " in pushed.stdout
                     else f"exit {pushed.returncode}: {pushed.stdout[-300:]}{pushed.stderr[-300:]}", "pushed"))
        second = _eventually(lambda: "backend:app-v2" in _tcp(engine, p, REPLICA_LISTENER, "hello"))
        rows.append(("  client -> Envoy -> app-v2, from the new topology", str(
            _tcp(engine, p, REPLICA_LISTENER, "hello") if second else "still app-v1"),
            f"backend:app-v2 client:{CLIENT} hello"))
        rows.append(("  the Envoy's xDS replica after the push", str(_xds_replica(engine)), other))
        print(f"\n{p}:\n{_table(rows)}")
        if any(seen != want for _, seen, want in rows):
            logs = engine.compose("logs", "--no-color", "--tail", "40", profile=p).stdout
            pytest.fail(f"{p}:\n{_table(rows)}\n\n{logs}", pytrace=False)
    finally:
        if traffic is not None and traffic.poll() is None:
            with contextlib.suppress(Exception):
                engine.exec_client(p, "touch /tmp/stop-traffic")
            try:
                traffic.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                traffic.kill()
                traffic.communicate(timeout=10)
        engine.down(p)
    engine.assert_nothing_left()
