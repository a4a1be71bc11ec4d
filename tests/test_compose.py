"""docker-compose.yml: the talk's four scenarios on real Envoy, HAProxy and nginx images.

tests/test_compose_up.py brings every scenario up for real (podman's Docker API). This checks, with
no container at all, what would make `docker-compose --profile <scenario> up`
fail or show the wrong client address: the file is valid for docker-compose, every path it mounts
exists, every topology and node it names exists, each Envoy's bootstrap is what `keepsrc bootstrap`
prints now, each Envoy owns its listeners' addresses, the load balancer's PROXY header lands on a
listener that reads it, every original_src node has NET_ADMIN and its netplan, and xDS is mutual TLS
with the certificates keepsrc-certs writes into the volume `pki`, each Envoy showing its own entry's.

After a change to `keepsrc bootstrap`, regenerate the bootstraps and review the diff:
    deploy/compose/regenerate-bootstraps
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from keepsrc.topology import Proxy, Topology, load_topology
from tests.support.strict import require_binary

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
BOOTSTRAPS = ROOT / "deploy/compose/bootstrap"
REGENERATE = "deploy/compose/regenerate-bootstraps"
SCENARIOS = ("inner-http", "external-http", "inner-tcp", "external-tcp")
REPLICAS = "replicas"  # not a scenario: two `keepsrc serve --store etcd://...` and one Envoy listing both
PKI_VOLUME = "pki"
CERTS = "keepsrc-certs"


def _load_bootstraps() -> object:
    """deploy/compose/bootstraps.py: what `keepsrc bootstrap` prints for each Envoy (regenerate-bootstraps runs it)."""
    spec = importlib.util.spec_from_file_location("compose_bootstraps", ROOT / "deploy/compose/bootstraps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bootstraps: Any = _load_bootstraps()


@dataclass(frozen=True)
class Service:
    name: str
    spec: dict[str, Any]

    @property
    def image(self) -> str:
        return str(self.spec.get("image", ""))

    @property
    def is_envoy(self) -> bool:
        return self.image.startswith("envoyproxy/envoy:")

    @property
    def profiles(self) -> list[str]:
        return list(self.spec.get("profiles", []))

    @property
    def command(self) -> list[str]:
        return [str(arg) for arg in self.spec.get("command", [])]

    @property
    def ip(self) -> str | None:
        return (self.spec.get("networks", {}).get("lab") or {}).get("ipv4_address")

    @property
    def netns_owner(self) -> str | None:
        """The service whose network namespace this one shares (network_mode: service:NAME)."""
        mode = str(self.spec.get("network_mode", ""))
        return mode.removeprefix("service:") if mode.startswith("service:") else None

    def mounts(self) -> dict[str, Path]:
        """Container path -> host path of each bind mount; compose resolves ./ from the file's directory."""
        result = {}
        for volume in self.spec.get("volumes", []):
            source, target = str(volume).split(":")[:2]
            if source.startswith((".", "/")):
                result[target] = (COMPOSE_FILE.parent / source).resolve()
        return result

    def named_volumes(self) -> dict[str, str]:
        """Container path -> named volume (`pki:/etc/keepsrc/pki:ro`), with `:ro` kept on the name."""
        result = {}
        for volume in self.spec.get("volumes", []):
            source, target, *mode = str(volume).split(":")
            if not source.startswith((".", "/")):
                result[target] = source + "".join(f":{m}" for m in mode)
        return result

    def host_path(self, container_path: str) -> Path:
        """The host file a container path refers to, through the bind mount that contains it."""
        for target, source in self.mounts().items():
            if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
                return source / Path(container_path).relative_to(target)
        raise AssertionError(f"service {self.name}: {container_path} is inside no bind mount")

    def option(self, flag: str) -> str | None:
        return self.command[self.command.index(flag) + 1] if flag in self.command else None


@cache
def services() -> dict[str, Service]:
    # PyYAML resolves the `<<: *anchor` merges exactly as docker-compose does.
    spec = yaml.safe_load(COMPOSE_FILE.read_text())
    return {name: Service(name, body) for name, body in spec["services"].items()}


def in_scenario(scenario: str) -> list[Service]:
    return [s for s in services().values() if scenario in s.profiles]


def scenario_topology(scenario: str) -> tuple[Path, Topology]:
    """The topology the scenario's keepsrc server serves (`keepsrc serve FILE`)."""
    (server,) = [s for s in in_scenario(scenario) if s.command[:1] == ["serve"]]
    assert server.name == f"keepsrc-{scenario}", "the bootstraps point Envoys at keepsrc-<scenario>"
    path = server.host_path(server.command[1])
    return path, load_topology(path)


def envoy_node(service: Service) -> tuple[str, Proxy]:
    """An Envoy service's scenario and its proxy entry, from its bootstrap's name <scenario>-<node>.yaml."""
    (scenario,) = service.profiles
    bootstrap = service.mounts()["/etc/envoy/envoy.yaml"]
    node = bootstrap.stem.removeprefix(f"{scenario}-")
    assert bootstrap.parent == BOOTSTRAPS and bootstrap.stem == f"{scenario}-{node}", (
        f"{service.name} mounts {bootstrap}; expected {BOOTSTRAPS}/{scenario}-<node>.yaml"
    )
    proxies = scenario_topology(scenario)[1].proxies
    assert node in list(proxies), f"{service.name}: no node '{node}' in examples/{scenario}.yaml"
    return scenario, proxies[node]


def names(predicate: Callable[[Service], bool]) -> list[str]:
    """The scenario services that satisfy `predicate`; another profile (e.g. replicas) has its own tests."""
    return [s.name for s in services().values() if set(s.profiles) & set(SCENARIOS) and predicate(s)]


ENVOYS = names(lambda s: s.is_envoy)
HAPROXIES = names(lambda s: s.image.startswith("haproxy:"))


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    binary = require_binary("docker-compose")
    # A developer's COMPOSE_FILE / COMPOSE_PROFILES / COMPOSE_PROJECT_NAME must not change what is checked.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    return subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )


def all_profiles() -> list[str]:
    return sorted({p for s in services().values() for p in s.profiles})


@pytest.mark.parametrize("profile", [None, *all_profiles()])
def test_docker_compose_accepts_the_file(profile: str | None) -> None:
    result = _compose(*(["--profile", profile] if profile else []), "config", "-q")
    assert result.returncode == 0, f"docker-compose config rejects {COMPOSE_FILE.name}:\n{result.stderr}"


def test_every_scenario_is_a_profile_serving_its_example() -> None:
    used = set(all_profiles())
    assert set(SCENARIOS) <= used, f"profiles {sorted(used)}; the scenarios are {SCENARIOS}"
    for scenario in SCENARIOS:
        path, _ = scenario_topology(scenario)
        assert path == (ROOT / "examples" / f"{scenario}.yaml").resolve()  # examples/ is a symlink


@pytest.mark.parametrize("name", list(services()))
def test_referenced_paths_exist(name: str) -> None:
    service = services()[name]
    if "build" in service.spec:
        assert (COMPOSE_FILE.parent / service.spec["build"] / "Dockerfile").is_file()
    for target, source in service.mounts().items():
        assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"


@pytest.mark.parametrize("name", names(lambda s: "--node" in s.command))
def test_netplan_nodes_exist_in_their_topology(name: str) -> None:
    service = services()[name]
    path = service.host_path(service.command[1])
    proxies = load_topology(path).proxies
    assert service.option("--node") in list(proxies), f"{name}: no node {service.option('--node')} in {path}"


@pytest.mark.parametrize("name", ENVOYS)
def test_envoy_bootstrap_is_what_keepsrc_prints_now(name: str) -> None:
    scenario, proxy = envoy_node(services()[name])
    server = f"keepsrc-{scenario}"
    assert server in services() and scenario in services()[server].profiles, f"{name}: no xDS server {server}"
    bootstrap = BOOTSTRAPS / f"{scenario}-{proxy.name}.yaml"
    assert bootstraps.split(bootstrap) == (scenario, proxy.name)
    assert bootstraps.arguments(scenario, proxy.name)[:5] == ["bootstrap", "--node", proxy.name, "--xds",
                                                               f"{server}:18000"]
    expected = bootstraps.render(scenario, proxy.name)
    assert bootstrap.read_text() == expected, f"{bootstrap} is stale: run {REGENERATE} and review the diff"


def _certs_script() -> str:
    return "\n".join(services()[CERTS].command)


def _flag_values(text: str, flag: str) -> list[str]:
    return re.findall(rf"{flag}\s+(\S+)", text)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_keepsrc_serves_mutual_tls_from_the_certs_volume(scenario: str) -> None:
    server = services()[f"keepsrc-{scenario}"]
    assert "--insecure" not in server.command, f"{server.name}: plaintext xDS"
    pki = bootstraps.PKI
    assert (server.option("--tls-cert"), server.option("--tls-key"), server.option("--client-ca")) == (
        f"{pki}/server.pem", f"{pki}/server-key.pem", f"{pki}/ca.pem"), server.command
    assert server.named_volumes().get(pki) == f"{PKI_VOLUME}:ro", f"{server.name}: mount {PKI_VOLUME} at {pki}, ro"
    assert server.spec.get("environment", {}).get("KEEPSRC_HEALTH_TLS") == pki, "its HEALTHCHECK must use TLS"
    assert server.spec.get("depends_on", {}).get(CERTS) == {"condition": "service_completed_successfully"}
    # The name every Envoy checks keepsrc's certificate for, and localhost for the HEALTHCHECK.
    names = _flag_values(_certs_script(), "--server-name")
    assert bootstraps.server_name(scenario) in names and "localhost" in names, names


@pytest.mark.parametrize("name", ENVOYS)
def test_envoy_shows_its_own_entry_certificate_from_the_volume(name: str) -> None:
    service = services()[name]
    scenario, proxy = envoy_node(service)
    assert service.named_volumes().get(bootstraps.PKI) == f"{PKI_VOLUME}:ro", f"{name}: no {PKI_VOLUME} volume"
    assert service.spec.get("depends_on", {}).get(CERTS) == {"condition": "service_completed_successfully"}, (
        f"{name} must start after {CERTS} wrote the certificates its bootstrap names")
    bootstrap = yaml.safe_load((BOOTSTRAPS / f"{scenario}-{proxy.name}.yaml").read_text())
    (cluster,) = bootstrap["static_resources"]["clusters"]
    context = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    (sds,) = context["tls_certificate_sds_secret_configs"]
    certificate = f"{bootstraps.PKI}/proxies/{proxy.name}.pem"
    assert sds["sds_config"]["path_config_source"]["path"] == f"{certificate}.keepsrc-sds.json"
    assert context["validation_context"]["trusted_ca"]["filename"] == f"{bootstraps.PKI}/ca.pem"
    # keepsrc-certs issues that certificate and writes the SDS file beside it (keepsrc bootstrap).
    script = _certs_script()
    assert proxy.name in _flag_values(script, "--proxy"), f"{CERTS} issues no certificate for {proxy.name}"
    loop = re.search(r"for node in ([^;]+);", script)
    assert loop and proxy.name in loop.group(1).split(), f"{CERTS} writes no SDS file for {proxy.name}"


def test_the_certs_one_shot() -> None:
    certs = services()[CERTS]
    assert set(certs.profiles) == {*SCENARIOS, REPLICAS}, certs.profiles
    assert certs.named_volumes() == {bootstraps.PKI: PKI_VOLUME}, "it writes the volume, and needs nothing else"
    assert certs.spec.get("network_mode") == "none", "it needs no network"
    script = _certs_script()
    assert script.startswith(f"cd {bootstraps.PKI}\nkeepsrc certs . "), script
    # Each private key to the one user that reads it: keepsrc's image user, and the Envoy image's.
    assert "chown 10001:10001 server-key.pem admin-key.pem" in script and "chown 101:101 proxies/*-key.pem" in script
    spec = yaml.safe_load(COMPOSE_FILE.read_text())
    assert PKI_VOLUME in spec.get("volumes", {}), f"no named volume {PKI_VOLUME}"


def test_no_unused_bootstraps() -> None:
    envoys = ENVOYS + [s.name for s in in_scenario(REPLICAS) if s.is_envoy]
    used = {services()[name].mounts()["/etc/envoy/envoy.yaml"] for name in envoys}
    unused = set(BOOTSTRAPS.glob("*.yaml")) - used
    assert not unused, f"bootstraps no Envoy in docker-compose.yml mounts: {sorted(map(str, unused))}"


@pytest.mark.parametrize("name", ENVOYS)
def test_envoy_owns_its_listener_addresses(name: str) -> None:
    service = services()[name]
    _, proxy = envoy_node(service)
    for listener in proxy.listeners:
        assert listener.address.host in (service.ip, "0.0.0.0"), (
            f"{name} has {service.ip}; it could not bind listener {listener.name} on {listener.address}"
        )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_addresses_are_unique_within_a_scenario(scenario: str) -> None:
    ips = [s.ip for s in in_scenario(scenario) if s.ip]
    assert len(ips) == len(set(ips)), f"{scenario}: an address is given twice: {sorted(ips)}"
    # Without a fixed address Docker picks one from the subnet, possibly one a later container needs.
    loose = [s.name for s in in_scenario(scenario)
             if not s.ip and not s.netns_owner and s.spec.get("network_mode") != "none"]
    assert not loose, f"{scenario}: services with neither ipv4_address nor network_mode service: {loose}"


@pytest.mark.parametrize("name", ENVOYS)
def test_only_original_src_nodes_get_net_admin_and_a_netplan(name: str) -> None:
    service = services()[name]
    scenario, proxy = envoy_node(service)
    netplans = [s for s in in_scenario(scenario) if s.netns_owner == name and s.command[:1] == ["netplan"]]
    privileged = {
        "NET_ADMIN": "NET_ADMIN" in service.spec.get("cap_add", []),
        "ENVOY_UID=0": str(service.spec.get("environment", {}).get("ENVOY_UID")) == "0",
        "route_localnet": str(service.spec.get("sysctls", {}).get("net.ipv4.conf.all.route_localnet")) == "1",
    }
    if not any(listener.original_src for listener in proxy.listeners):
        # Least privilege: an Envoy that never binds a foreign address runs as the envoy user.
        assert not any(privileged.values()) and not netplans, f"{name}: {privileged}, netplans {netplans}"
        return
    # IP_TRANSPARENT needs NET_ADMIN, which the Envoy image drops by switching to the envoy user
    # unless ENVOY_UID is 0; the replies from 127.0.0.1 need route_localnet.
    assert all(privileged.values()), f"{name} has original_src: {privileged}"
    assert len(netplans) == 1, f"{name}: wants one `keepsrc netplan` container in its network namespace"
    (netplan,) = netplans
    assert netplan.host_path(netplan.command[1]) == scenario_topology(scenario)[0]
    assert netplan.option("--node") == proxy.name and "--apply" in netplan.command, netplan.command
    assert "NET_ADMIN" in netplan.spec.get("cap_add", []), f"{netplan.name}: iptables and ip rule need NET_ADMIN"


@pytest.mark.parametrize("name", names(lambda s: s.spec.get("entrypoint", [])[-1:] == ["keepsrc.demo.backends"]))
def test_backends_listen_where_the_topology_sends(name: str) -> None:
    service = services()[name]
    owner = services()[str(service.netns_owner)]
    (scenario,) = service.profiles
    _, topology = scenario_topology(scenario)
    listen = service.command[1]
    endpoints = {str(e) for s in topology.services.values() for e in s.endpoints}
    assert listen in endpoints, f"{name} listens on {listen}; examples/{scenario}.yaml sends to {sorted(endpoints)}"
    # 127.0.0.1 is the Envoy host's own loopback only when the backend shares the Envoy's netns.
    assert owner.is_envoy, f"{name} must share an Envoy's network namespace, not {owner.name}'s"


SERVER_LINE = re.compile(r"^\s*server\s+\S+\s+([\d.]+):(\d+)(.*)$", re.MULTILINE)


@pytest.mark.parametrize("name", HAPROXIES)
def test_load_balancer_proxy_header_reaches_a_reader(name: str) -> None:
    service = services()[name]
    (scenario,) = service.profiles
    config = service.mounts()["/usr/local/etc/haproxy/haproxy.cfg"].read_text()
    by_ip = {s.ip: s for s in in_scenario(scenario) if s.ip}
    servers = SERVER_LINE.findall(config)
    assert any("send-proxy-v2" in options.split() for _, _, options in servers), f"{name}: no send-proxy-v2 server"
    for ip, port, options in servers:
        target = by_ip.get(ip)
        assert target, f"{name}: no service of {scenario} has {ip}"
        if "send-proxy-v2" not in options.split():
            # A negative path (the client is lost on purpose): the target must not expect a header,
            # or it would refuse the connection instead of showing HAProxy's address.
            assert not target.is_envoy, f"{name}: {ip}:{port} gets no PROXY header; only nginx has a plain port"
            conf = "\n".join(p.read_text() for p in target.mounts().values() if p.is_file())
            assert re.search(rf"^\s*listen\s+{port}\s*;", conf, re.MULTILINE), (
                f"{name}: {target.name} has no plain `listen {port};` for the path without PROXY protocol"
            )
            continue
        if target.is_envoy:
            _, proxy = envoy_node(target)
            readers = [
                lst for lst in proxy.listeners
                if str(lst.address) == f"{ip}:{port}" and lst.accept_proxy_protocol
                and "v2" in lst.accept_proxy_protocol.versions
            ]
            assert readers, f"{name}: {target.name} has no listener on {ip}:{port} that accepts PROXY v2"
        else:
            conf = "\n".join(p.read_text() for p in target.mounts().values() if p.is_file())
            assert re.search(rf"^\s*listen\s+{port}\s+proxy_protocol\s*;", conf, re.MULTILINE), (
                f"{name}: {target.name} does not `listen {port} proxy_protocol`"
            )


@pytest.mark.parametrize("name", HAPROXIES)
def test_haproxy_accepts_its_config(name: str) -> None:
    haproxy = require_binary("haproxy")
    config = services()[name].mounts()["/usr/local/etc/haproxy/haproxy.cfg"]
    result = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"haproxy -c rejects {config}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("name", names(lambda s: s.image.startswith("nginx:")))
def test_nginx_accepts_its_config(name: str, tmp_path: Path) -> None:
    nginx = require_binary("nginx")
    conf = services()[name].mounts()["/etc/nginx/conf.d/default.conf"]
    # The image includes conf.d/*.conf inside its http block; this wraps the file the same way.
    main_conf = tmp_path / "nginx.conf"
    main_conf.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{ include {conf}; }}\n")
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(main_conf)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, f"nginx -t rejects {conf}:\n{result.stderr}"


def _qualified(image: str) -> str:
    """What podman's Docker API calls an image: docker.io/library/haproxy:3.2 for haproxy:3.2."""
    if "/" not in image:
        image = f"library/{image}"
    return image if "." in image.split("/")[0] else f"docker.io/{image}"


def test_every_image_has_a_stand_in() -> None:
    """Where no registry answers, scripts/build-standin-images must make every image the stack runs on."""
    listed = subprocess.run(
        [str(ROOT / "scripts/build-standin-images"), "--list"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    wanted = {_qualified(services()[name].image) for name in names(lambda s: "build" not in s.spec)}
    wanted |= {_qualified(s.image) for s in in_scenario(REPLICAS) if "build" not in s.spec}
    wanted |= {_qualified(line.split()[1]) for line in (ROOT / "Dockerfile").read_text().splitlines()
               if line.startswith("FROM ")}
    assert wanted <= set(listed), f"no stand-in for {sorted(wanted - set(listed))}"


def test_the_lab_network_reaches_nothing_else() -> None:
    spec = yaml.safe_load(COMPOSE_FILE.read_text())
    lab = spec["networks"]["lab"]
    assert lab.get("internal") is True, "the lab network should be internal: no route out of it"
    assert [c["subnet"] for c in lab["ipam"]["config"]] == ["198.18.0.0/16"]
    published = names(lambda s: bool(s.spec.get("ports")))
    assert not published, f"services publishing ports to the host: {published}"


def test_keepsrc_runs_unprivileged_except_the_netplan_and_certs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), f"Dockerfile's last USER: {users}"
    assert re.search(r"^HEALTHCHECK\s.*grpc_health", dockerfile, re.MULTILINE), "Dockerfile has no gRPC HEALTHCHECK"
    for name in names(lambda s: s.spec.get("image") == "keepsrc:compose"):
        service = services()[name]
        # The netplan needs NET_ADMIN; keepsrc-certs hands each private key to the user that reads it.
        is_netplan = service.command[:1] == ["netplan"] or name == CERTS
        assert (service.spec.get("user") == "root") == is_netplan, f"{name}: user {service.spec.get('user')}"
        # The image's HEALTHCHECK asks keepsrc serve; anything else must switch it off.
        is_server = service.command[:1] == ["serve"]
        disabled = (service.spec.get("healthcheck") or {}).get("disable") is True
        assert disabled != is_server, f"{name}: healthcheck {'off' if disabled else 'on'}"


# -- the profile `replicas`: etcd, a one-shot push into it, two replicas, one Envoy listing both ---------
def _replicas(predicate: Callable[[Service], bool]) -> list[Service]:
    return [s for s in in_scenario(REPLICAS) if predicate(s)]


def test_replicas_profile_push_replicas_and_envoy() -> None:
    (etcd,) = _replicas(lambda s: s.image.startswith("gcr.io/etcd-development/etcd:"))
    (push,) = _replicas(lambda s: "keepsrc push" in "\n".join(s.command))
    assert push.netns_owner == etcd.name, "replicas-push reaches etcd on 127.0.0.1:2379, in its network namespace"
    assert "--store etcd://127.0.0.1:2379/keepsrc/replicas" in "\n".join(push.command)
    topologies = push.mounts()["/etc/keepsrc/replicas"]
    for name in ("topology.yaml", "topology-v2.yaml"):
        assert "ingress" in list(load_topology(topologies / name).proxies), f"{name}: no proxy entry ingress"
    servers = _replicas(lambda s: s.command[:1] == ["serve"])
    assert [s.name for s in servers] == list(bootstraps.REPLICA_SERVERS)
    for server in servers:
        assert server.option("--store") == f"etcd://{etcd.name}:2379/keepsrc/replicas", server.command
        assert "--insecure" not in server.command
        pki = bootstraps.PKI
        assert (server.option("--tls-cert"), server.option("--tls-key"), server.option("--client-ca")) == (
            f"{pki}/server.pem", f"{pki}/server-key.pem", f"{pki}/ca.pem"), server.command
        assert server.named_volumes().get(pki) == f"{PKI_VOLUME}:ro"
        assert server.mounts()["/etc/keepsrc/replicas"] == topologies, "to push topology-v2.yaml from a replica"
        assert server.spec.get("environment", {}).get("KEEPSRC_HEALTH_TLS") == pki
        assert server.spec["depends_on"] == {CERTS: {"condition": "service_completed_successfully"},
                                             push.name: {"condition": "service_completed_successfully"}}
        assert "healthcheck" not in server.spec and "user" not in server.spec, "the image's user and HEALTHCHECK"
    assert bootstraps.server_name(REPLICAS) in _flag_values(_certs_script(), "--server-name")
    (envoy,) = _replicas(lambda s: s.is_envoy)
    bootstrap = envoy.mounts()["/etc/envoy/envoy.yaml"]
    scenario, node = bootstraps.split(bootstrap)
    assert (scenario, bootstrap.parent) == (REPLICAS, BOOTSTRAPS)
    assert bootstrap.read_text() == bootstraps.render(scenario, node), f"{bootstrap} is stale: run {REGENERATE}"
    assert envoy.named_volumes().get(bootstraps.PKI) == f"{PKI_VOLUME}:ro"
    assert set(envoy.spec["depends_on"]) == {CERTS, *bootstraps.REPLICA_SERVERS}
    script = _certs_script()
    loop = re.search(r"for node in ([^;]+);", script)
    assert node in _flag_values(script, "--proxy") and loop and node in loop.group(1).split()
    for name in ("topology.yaml", "topology-v2.yaml"):
        (listener,) = load_topology(topologies / name).proxies[node].listeners
        assert listener.address.host == envoy.ip, f"{name}: the Envoy ({envoy.ip}) could not bind {listener.address}"
    # Both topologies' endpoints have a backend in the Envoy's network namespace.
    backends = _replicas(lambda s: s.spec.get("entrypoint", [])[-1:] == ["keepsrc.demo.backends"])
    assert all(b.netns_owner == envoy.name for b in backends)
    endpoints = {str(e) for name in ("topology.yaml", "topology-v2.yaml")
                 for svc in load_topology(topologies / name).services.values() for e in svc.endpoints}
    assert endpoints == {b.command[1] for b in backends}, endpoints


def test_replicas_profile_addresses() -> None:
    ips = [s.ip for s in in_scenario(REPLICAS) if s.ip]
    assert len(ips) == len(set(ips)), f"an address is given twice: {sorted(ips)}"
    loose = [s.name for s in in_scenario(REPLICAS)
             if not s.ip and not s.netns_owner and s.spec.get("network_mode") != "none"]
    assert not loose, f"services with neither ipv4_address nor network_mode service: {loose}"
    assert not [s.name for s in in_scenario(REPLICAS) if s.spec.get("ports")], "no port is published"
    for service in _replicas(lambda s: s.spec.get("image") == "keepsrc:compose"):
        is_server = service.command[:1] == ["serve"]
        disabled = (service.spec.get("healthcheck") or {}).get("disable") is True
        assert disabled != is_server, f"{service.name}: healthcheck {'off' if disabled else 'on'}"
        assert service.spec.get("user") in (None, "root") and (service.spec.get("user") == "root") == (
            service.name == CERTS), f"{service.name}: runs as {service.spec.get('user')}"
