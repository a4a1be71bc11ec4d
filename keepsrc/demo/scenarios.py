"""The talk's four scenarios, for real: a keepsrc server, Envoys, HAProxy, nginx and backends that
report the client address they saw. `keepsrc demo` prints the rows; the tests assert them.

Every scenario deploys a topology from examples/ (or a variant of it, edited in plain sight
by `_edit`) onto the hosts of a Network, sends traffic from the client host and reads back what
the backend saw. Negative rows run the same path without keepsrc's settings and expect the
proxy's address, so a broken mechanism cannot pass unnoticed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from keepsrc.demo.backends import seen_source
from keepsrc.demo.envoy import Envoy, free_port
from keepsrc.demo.hosts import Host, Network
from keepsrc.demo.netns import stop_processes, wait_for
from keepsrc.demo.nginx import nginx_conf
from keepsrc.demo.replicas import replicas
from keepsrc.demo.tls_scenarios import NGINX_TLS_CONF, DemoPki, TlsReply, tls_exchange
from keepsrc.demo.xds_mtls import XdsPki, xds_mtls
from keepsrc.snapshots.bootstrap import xds_bootstrap
from keepsrc.snapshots.render import to_dict
from keepsrc.topology import SocketAddress, load_topology

CLIENT, CLIENT2, CLIENT6 = "198.18.0.10", "198.18.0.11", "2001:db8::10"
CLIENTS = tuple(f"198.18.0.{n}" for n in range(10, 15))
LB, LB6 = "198.18.1.2", "2001:db8::1:2"
INGRESS, SVC_A, SVC_B, SVC_B6 = "198.18.2.2", "198.18.3.2", "198.18.4.2", "2001:db8::4:2"
FORGED = "198.18.9.9"  # what a client claims in its own X-Forwarded-For header
REFUSED = "refused"
NO_ANSWER = "no answer"


@dataclass
class Row:
    scenario: str
    path: str
    seen: str
    expected: str

    @property
    def passed(self) -> bool:
        return self.seen == self.expected


@dataclass
class Skip:
    scenario: str
    reason: str


def example(name: str) -> str:
    return resources.files("keepsrc").joinpath(f"examples/{name}").read_text(encoding="utf-8")


def _edit(text: str, *replacements: tuple[str, str]) -> str:
    """A variant of an example; every replaced snippet must be there, so variants cannot rot."""
    for old, new in replacements:
        if old not in text:
            raise ValueError(f"variant edit: {old!r} not found in the example")
        text = text.replace(old, new)
    return text


# Run inside the client host: one TCP exchange, printing the reply (or "refused").
TCP_CLIENT = r"""
import socket, sys
from keepsrc.demo.backends import proxy_v2_header
src, host, port, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
if sys.argv[5]:  # play the load balancer: a PROXY v2 header naming this client first
    payload = proxy_v2_header(sys.argv[5], host, 40000, port) + payload
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.settimeout(8)
try:
    if src:
        s.bind((src, 0))
    s.connect((host, port))
    s.sendall(payload)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
except OSError:
    data = b""
print(data.decode(errors="replace") or "refused")
"""

WAIT_PORT = r"""
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 15
while time.monotonic() < deadline:
    try:
        socket.create_connection((host, port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
"""

HAPROXY_CFG = """global
    log stdout format raw local0 info
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 3s
    timeout client 15s
    timeout server 15s
{frontends}
"""


def _haproxy_frontend(name: str, binds: list[str], target: str, send_proxy: str) -> str:
    bind_lines = "\n".join(f"    bind {b}" for b in binds)
    return f"frontend {name}\n{bind_lines}\n    default_backend {name}-be\nbackend {name}-be\n" \
           f"    server next {target} {send_proxy}\n"


NGINX_CONF = nginx_conf("""\
    log_format pp '$proxy_protocol_addr $remote_addr "$request"';
    server {{
        listen {listen} proxy_protocol;
        access_log {dir}/nginx-pp.log pp;
        location / {{ return 200 "$proxy_protocol_addr $remote_addr\\n"; }}
    }}
""")


@dataclass
class Deployment:
    """What runs for one scenario; `stop()` ends all of it (and removes any netplan applied)."""

    demo: Demo
    name: str
    envoys: list[Envoy] = field(default_factory=list)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    netplans: list[tuple[Host, Path, str]] = field(default_factory=list)
    topology_path: Path | None = None  # the file `keepsrc serve` watches: edit it to push a change
    socket_path: Path | None = None  # where `keepsrc serve` serves xDS (mutual TLS)
    pki: XdsPki | None = None  # the certificates of that mutual TLS
    server_log: Path | None = None
    metrics_port: int | None = None  # keepsrc serve --metrics 127.0.0.1:PORT, when asked for

    def envoy(self, node: str) -> Envoy:
        return next(e for e in self.envoys if e.name == f"{self.name}-{node}")

    def stop(self) -> None:
        for envoy in self.envoys:
            envoy.stop()
        stop_processes(self.processes)
        for host, path, node in self.netplans:
            host.run(sys.executable, "-m", "keepsrc.netplan", str(path), "--node", node, "--remove", check=False)


class Demo:
    def __init__(self, network: Network, workdir: Path, progress: Callable[[str], None] = lambda _: None) -> None:
        self.network = network
        self.workdir = workdir
        self.progress = progress

    # -- deploying ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def deploy(self, name: str, topology_text: str, backends: Sequence[tuple[str, ...]] = (),
               haproxy: list[tuple[list[str], str, str]] = (),  # type: ignore[assignment]
               nginx: str | None = None, netplan: bool = True, metrics: bool = False) -> Iterator[Deployment]:
        """Serve `topology_text` and start every proxy in it on the host of the same name.

        backends: (host, kind, address, *more arguments) run as `python -m keepsrc.demo.backends`;
        haproxy: (binds, target, "send-proxy-v2" | "send-proxy" | "") frontends on the lb host;
        nginx: an address on svc-b where nginx accepts PROXY protocol;
        netplan: apply `keepsrc netplan` on original_src nodes (off only for a negative row);
        metrics: `keepsrc serve --metrics` on a free port of 127.0.0.1 (Deployment.metrics_port).

        xDS runs over mutual TLS, as in production: `keepsrc certs`' files (write_pki) for the
        topology's proxy entries in the work directory, `serve --tls-cert/--tls-key/--client-ca`,
        and each Envoy's bootstrap with its own entry's certificate (XdsTls), on a unix socket.
        """
        deployment = Deployment(self, name)
        try:
            self._start(deployment, name, self.network.translate(topology_text), backends, haproxy, nginx, netplan,
                        metrics)
            yield deployment
        finally:
            deployment.stop()

    def _start(self, deployment: Deployment, name: str, text: str, backends: Sequence[tuple[str, ...]],
               haproxy: list[tuple[list[str], str, str]], nginx: str | None, netplan: bool, metrics: bool) -> None:
        path = self.workdir / f"{name}.yaml"
        path.write_text(text)
        deployment.topology_path = path
        topology = load_topology(path)
        socket_path = self.workdir / f"{name}.sock"
        socket_path.unlink(missing_ok=True)
        deployment.socket_path = socket_path
        pki = deployment.pki = XdsPki(self.workdir / f"{name}.pki", list(topology.proxies))
        pki.write()
        deployment.server_log = self.workdir / f"{name}.server.log"
        extra: list[str] = []
        if metrics:
            deployment.metrics_port = free_port()
            extra = ["--metrics", f"127.0.0.1:{deployment.metrics_port}"]
        with deployment.server_log.open("w") as server_log:
            server = subprocess.Popen(
                [sys.executable, "-m", "keepsrc", "serve", str(path), "--listen", f"unix:{socket_path}",
                 *pki.serve_arguments(), *extra],
                stdout=server_log, stderr=subprocess.STDOUT,
            )
        deployment.processes.append(server)
        wait_for(lambda: socket_path.exists() or server.poll() is not None, 30, f"keepsrc serve on {socket_path}")
        if server.poll() is not None:
            tail = deployment.server_log.read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"keepsrc serve exited {server.returncode}: {tail}")
        for host_name, kind, address, *arguments in backends:
            self._backend(deployment, self.network.host(host_name), kind, self.network.translate(address), arguments)
        for node, proxy in topology.proxies.items():
            host = self.network.host(node)
            self.progress(f"  starting Envoy {node}")
            bootstrap = to_dict(xds_bootstrap(node, PurePosixPath(socket_path), SocketAddress("127.0.0.1", 0),
                                              tls=pki.envoy_tls(node)))
            envoy = Envoy(bootstrap, self.workdir, name=f"{name}-{node}", netns=self.network.netns_of(node))
            deployment.envoys.append(envoy)
            envoy.start()
            envoy.wait_ready(timeout=30)
            if netplan and any(listener.original_src is not None for listener in proxy.listeners):
                host.run(sys.executable, "-m", "keepsrc.netplan", str(path), "--node", node, "--apply")
                deployment.netplans.append((host, path, node))
        if nginx is not None:
            self.start_nginx(deployment, self.network.translate(nginx))
        if haproxy:
            self._haproxy(deployment, name, haproxy)

    def _backend(self, deployment: Deployment, host: Host, kind: str, address: str, arguments: list[str]) -> None:
        log = self.workdir / f"{deployment.name}.{kind}-{address.replace(':', '_')}.log"
        with log.open("w") as out:
            deployment.processes.append(host.popen(
                [sys.executable, "-m", "keepsrc.demo.backends", kind, address, "--name", f"{kind}@{address}",
                 *arguments],
                stdout=out, stderr=subprocess.STDOUT,
            ))
        # The backend says when it listens (a UDP one cannot be probed with a connection).
        wait_for(lambda: "listening" in log.read_text(), 15, f"{kind} backend on {address} in {host.name}")

    def _wait_port(self, host: Host, address: str) -> None:
        ip, _, port = address.rpartition(":")
        if host.run(sys.executable, "-c", WAIT_PORT, ip.strip("[]"), port, check=False).returncode != 0:
            raise RuntimeError(f"nothing listens on {address} on host {host.name}")

    def _haproxy(self, deployment: Deployment, name: str, frontends: list[tuple[list[str], str, str]]) -> None:
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise RuntimeError("haproxy is not installed (scripts/setup installs it as root)")
        text = HAPROXY_CFG.format(frontends="\n".join(
            _haproxy_frontend(f"fe{i}", binds, target, send)
            for i, (binds, target, send) in enumerate(frontends)
        ))
        config = self.workdir / f"{name}.haproxy.cfg"
        config.write_text(self.network.translate(text))
        host = self.network.host("lb")
        deployment.processes.append(host.popen([haproxy, "-f", str(config), "-db"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # Wait for the listening sockets (ss), not with a test connection: HAProxy would forward it
        # with a PROXY header naming itself, and it would show up in the Envoys' access logs.
        ports = {bind.rpartition(":")[2] for binds, _, _ in frontends for bind in binds}
        wait_for(lambda: all(host.run("ss", "-Hltn", f"sport = :{p}", check=False).stdout.strip() for p in ports),
              15, f"HAProxy listening on {', '.join(sorted(ports))}")

    def start_nginx(self, deployment: Deployment, listen: str, conf: str = NGINX_CONF, **values: str) -> Path:
        """nginx on svc-b, from the template `conf` (`{dir}`, `{listen}` and `values` filled in); its directory,
        one per deployment, holds its logs."""
        nginx = shutil.which("nginx") or (Path("/usr/sbin/nginx") if Path("/usr/sbin/nginx").exists() else None)
        if nginx is None:
            raise RuntimeError("nginx is not installed (scripts/setup installs it as root)")
        directory = self.workdir / f"{deployment.name}.nginx"
        directory.mkdir(exist_ok=True)
        config = directory / "nginx.conf"
        config.write_text(conf.format(dir=directory, listen=listen, **values))
        host = self.network.host("svc-b")
        deployment.processes.append(host.popen([str(nginx), "-c", str(config), "-p", str(directory)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait_port(host, listen)
        return directory

    # -- traffic --------------------------------------------------------------------------------
    def tcp(self, address: str, payload: str = "hello\n", source: str = "", proxy_header_for: str = "") -> str:
        """One TCP exchange from the client host; the reply text, or 'refused'. With
        `proxy_header_for`, the client sends a PROXY v2 header naming that address first."""
        address = self.network.translate(address)
        ip, _, port = address.rpartition(":")
        source = self.network.translate(source) if self.network.netns else ""
        result = self.network.host("client").run(sys.executable, "-c", TCP_CLIENT, source, ip.strip("[]"), port,
                                                 payload, proxy_header_for, check=False)
        return result.stdout.replace("\r\n", "\n").strip() or REFUSED  # HTTP's CRLF, normalised

    def tcp_seen(self, address: str, source: str = "", proxy_header_for: str = "") -> str:
        """The client a keepsrc.demo TCP backend saw ('backend:NAME client:IP ...')."""
        reply = self.tcp(address, "hello\n", source, proxy_header_for)
        return self.untranslate(reply.split()[1].removeprefix("client:")) if reply.startswith("backend:") \
            else reply

    def http(self, address: str, headers: dict[str, str] | None = None, source: str = "",
             proxy_header_for: str = "") -> dict[str, Any] | str:
        lines = ["GET / HTTP/1.1", "Host: demo", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        reply = self.tcp(address, "\r\n".join(lines) + "\r\n\r\n", source, proxy_header_for)
        head, _, body = reply.partition("\n\n")
        if not head.startswith("HTTP/1.1 200"):
            return head.split("\n")[0] if head != REFUSED else REFUSED
        return json.loads(body)

    def xff_client(self, address: str, trusted: int, headers: dict[str, str] | None = None,
                   source: str = "", proxy_header_for: str = "") -> str:
        """The client as the backend reads it from X-Forwarded-For, skipping `trusted` proxies."""
        reply = self.http(address, headers, source, proxy_header_for)
        if isinstance(reply, str):
            return reply
        entries = [e.strip() for e in reply["headers"].get("x-forwarded-for", "").split(",") if e.strip()]
        return self.untranslate(entries[-1 - trusted]) if len(entries) > trusted else "no X-Forwarded-For"

    def tls(self, address: str, sni: str, ca: Path, payload: str = "", proxy_header_for: str = "") -> TlsReply:
        """One TLS exchange from the client host, which trusts only `ca` and checks the certificate
        names `sni`; with `proxy_header_for`, a PROXY v2 header naming that address goes first."""
        return tls_exchange(self.network.host("client"), self.network.translate(address), sni, ca, payload,
                            proxy_header_for)

    def sip(self, address: str) -> str:
        """Send a SIP OPTIONS over UDP from the client host; the source the SIP server saw."""
        result = self.network.host("client").run(
            sys.executable, "-m", "keepsrc.demo.backends", "sip-options", self.network.translate(address), check=False
        )
        return self.untranslate(seen_source(result.stdout.encode()) or NO_ANSWER)

    def access_log_row(self, scenario: str, deployment: Deployment, clients: set[str]) -> Row:
        """Every hop's access log names only the real clients (not a load balancer or proxy)."""
        def logged() -> dict[str, set[str]]:
            return {
                envoy.name.removeprefix(f"{deployment.name}-"): {
                    self.untranslate(entry["client"].rpartition(":")[0].strip("[]")) for entry in envoy.access_log()
                }
                for envoy in deployment.envoys
            }
        with contextlib.suppress(TimeoutError):  # Envoy flushes access logs about once a second
            wait_for(lambda: all(logged().values()), 10, "access logs")
        wrong = {name: sorted(seen - clients) or ["no entries"] for name, seen in logged().items()
                 if not seen or seen - clients}
        seen_text = "only the clients" if not wrong else "; ".join(f"{n}: {', '.join(v)}" for n, v in wrong.items())
        return Row(scenario, f"  access log of every hop ({len(deployment.envoys)} Envoys) names the client",
                   seen_text, "only the clients")

    def untranslate(self, address: str) -> str:
        """Show loopback-mode addresses as the plan's (127.18.X.Y -> 198.18.X.Y)."""
        if not self.network.netns and address.startswith("127.18."):
            return "198.18." + address.removeprefix("127.18.")
        return address


# -- the scenarios ---------------------------------------------------------------------------------
def inner_http(demo: Demo) -> list[Row]:
    name = "1 inner HTTP"
    path = "client -> svc-a Envoy -> svc-b Envoy -> backend (X-Forwarded-For)"
    text = example("inner-http.yaml")
    backends = [("svc-b", "http", "127.0.0.1:8080")]
    rows = []
    with demo.deploy("inner-http", text, backends) as deployment:
        rows.append(Row(name, path, demo.xff_client(f"{SVC_A}:15001", trusted=1), CLIENT))
        forged = demo.xff_client(f"{SVC_A}:15001", trusted=1, headers={"X-Forwarded-For": FORGED})
        rows.append(Row(name, "  client forges X-Forwarded-For: not believed", forged, CLIENT))
        reply = demo.http(f"{SVC_A}:15001")
        external = reply["headers"].get("x-envoy-external-address", "-") if isinstance(reply, dict) else reply
        rows.append(Row(name, "  svc-b's verdict (x-envoy-external-address)", demo.untranslate(external), CLIENT))
        rows.append(demo.access_log_row(name, deployment, {CLIENT}))
    without = _edit(text, ("xff: {use_remote_address: true, trusted_hops: 0}\n", "\n"))
    with demo.deploy("inner-http-without", without, backends):
        rows.append(Row(name, "  negative: svc-a without xff -> the proxy's address",
                        demo.xff_client(f"{SVC_A}:15001", trusted=0), SVC_A))
    return rows


def external_http(demo: Demo) -> list[Row]:
    name = "2 external HTTP"
    text = example("external-http.yaml")
    backends = [("svc-b", "http", "127.0.0.1:8080")]
    rows = []
    lb = [([f"{LB}:8000"], f"{INGRESS}:8000", "send-proxy-v2")]
    with demo.deploy("external-http", text, backends, haproxy=lb) as deployment:
        rows.append(Row(name, "client -> HAProxy (PROXY v2) -> ingress -> svc-b -> backend",
                        demo.xff_client(f"{LB}:8000", trusted=1), CLIENT))
        rows.append(demo.access_log_row(name, deployment, {CLIENT}))
        rows.append(Row(name, "  no PROXY header to a listener that requires one", demo.tcp(f"{INGRESS}:8000",
                        "GET / HTTP/1.1\r\nHost: x\r\n\r\n"), REFUSED))
    optional = _edit(text, ("accept_proxy_protocol: {versions: [v1, v2]}",
                            "accept_proxy_protocol: {versions: [v1, v2], optional: true}"))
    with demo.deploy("external-http-optional", optional, backends):
        rows.append(Row(name, "  optional: true accepts a client without a header",
                        demo.xff_client(f"{INGRESS}:8000", trusted=1), CLIENT))
    l3 = _edit(text, ("        accept_proxy_protocol: {versions: [v1, v2]}\n", ""))
    with demo.deploy("external-http-l3", l3, backends):
        rows.append(Row(name, "client -> (L3 load balancer) ingress -> svc-b -> backend, XFF only",
                        demo.xff_client(f"{INGRESS}:8000", trusted=1), CLIENT))
    with demo.deploy("external-http-without", l3, backends, haproxy=[([f"{LB}:8000"], f"{INGRESS}:8000", "")]):
        rows.append(Row(name, "  negative: HAProxy without PROXY protocol -> HAProxy's address",
                        demo.xff_client(f"{LB}:8000", trusted=1), LB))
    return rows


def inner_tcp(demo: Demo) -> list[Row]:
    name = "3 inner TCP"
    text = example("inner-tcp.yaml")
    backends = [("svc-b", "tcp", "127.0.0.1:9000")]
    rows = []
    with demo.deploy("inner-tcp", text, backends) as deployment:
        rows.append(Row(name, "client -> svc-b Envoy (original_src + netplan) -> TCP backend",
                        demo.tcp_seen(f"{SVC_B}:15006"), CLIENT))
        rows.append(demo.access_log_row(name, deployment, {CLIENT}))
    without = _edit(text, ("        original_src: {mark: 1337, placement: local}\n", ""))
    with demo.deploy("inner-tcp-without", without, backends):
        rows.append(Row(name, "  negative: without original_src -> Envoy's address",
                        demo.tcp_seen(f"{SVC_B}:15006"), "127.0.0.1"))
    return rows


def external_tcp(demo: Demo) -> list[Row]:
    name = "4 external TCP"
    text = example("external-tcp.yaml")
    backends = [("svc-b", "tcp", "127.0.0.1:9000")]
    lb_v2 = [([f"{LB}:9000", f"[{LB6}]:9000"], f"{INGRESS}:9000", "send-proxy-v2")]
    rows = []
    with demo.deploy("external-tcp", text, backends, haproxy=lb_v2) as deployment:
        rows.append(Row(name, "client -> HAProxy (v2) -> ingress (v2) -> svc-b (original_src) -> backend",
                        demo.tcp_seen(f"{LB}:9000"), CLIENT))
        with _concurrently() as run:
            first = run(lambda: demo.tcp_seen(f"{LB}:9000", source=CLIENT))
            second = run(lambda: demo.tcp_seen(f"{LB}:9000", source=CLIENT2))
        rows.append(Row(name, "  two clients at once: the first", first(), CLIENT))
        rows.append(Row(name, "  two clients at once: the second", second(), CLIENT2))
        rows.append(demo.access_log_row(name, deployment, {CLIENT, CLIENT2}))
    v1 = _edit(text, ("        accept_proxy_protocol: {versions: [v2]}\n",
                      "        accept_proxy_protocol: {versions: [v1]}\n"),
               ("    send_proxy_protocol: v2\n", "    send_proxy_protocol: v1\n"))
    with demo.deploy("external-tcp-v1", v1, backends, haproxy=[([f"{LB}:9000"], f"{INGRESS}:9000", "send-proxy")]):
        rows.append(Row(name, "  PROXY v1 on both hops", demo.tcp_seen(f"{LB}:9000"), CLIENT))
    v6 = _edit(text, ('    endpoints: ["127.0.0.1:9000"]', f'    endpoints: ["[{SVC_B6}]:9000"]'))
    with demo.deploy("external-tcp-ipv6", v6, [("svc-b", "tcp", f"[{SVC_B6}]:9000")], haproxy=lb_v2):
        rows.append(Row(name, "  IPv6 client", demo.tcp_seen(f"[{LB6}]:9000"), CLIENT6))
    pp_backend = _edit(text, ("        original_src: {mark: 1337, placement: local}\n", ""),
                       ('    endpoints: ["127.0.0.1:9000"]', '    endpoints: ["127.0.0.1:8081"]\n'
                                                              "    send_proxy_protocol: v2"))
    with demo.deploy("external-tcp-nginx", pp_backend, [], haproxy=lb_v2, nginx="127.0.0.1:8081"):
        reply = demo.tcp(f"{LB}:9000", "GET / HTTP/1.0\r\nHost: demo\r\n\r\n")
        seen = reply.partition("\n\n")[2].split()[0] if "\n\n" in reply else reply
        rows.append(Row(name, "  backend speaks PROXY protocol (nginx $proxy_protocol_addr)", seen, CLIENT))
    plain = _edit(text, ("        accept_proxy_protocol: true\n", ""), ("    send_proxy_protocol: v2\n", ""),
                  ("    health_check: {interval: 5s, timeout: 1s}\n", ""),
                  ("        accept_proxy_protocol: {versions: [v2]}\n", ""),
                  ("        original_src: {mark: 1337, placement: local}\n", ""))
    with demo.deploy("external-tcp-without", plain, backends,
                     haproxy=[([f"{LB}:9000"], f"{INGRESS}:9000", "")]):
        rows.append(Row(name, "  negative: no keepsrc settings -> svc-b Envoy's address",
                        demo.tcp_seen(f"{LB}:9000"), "127.0.0.1"))
    return rows


def allow_deny(demo: Demo) -> list[Row]:
    name = "5 deny by client IP"
    text = example("client-ip-policies.yaml")
    backends = [("svc-b", "tcp", f"{SVC_B}:9001"), ("svc-b", "http", f"{SVC_B}:8081")]
    lb = [([f"{LB}:9000"], f"{INGRESS}:9000", "send-proxy-v2"), ([f"{LB}:8000"], f"{INGRESS}:8000", "send-proxy-v2")]
    rows = []
    only_first = _edit(text, ('["198.18.4.2:9001", "198.18.4.2:9002", "198.18.4.2:9003"]', '["198.18.4.2:9001"]'))
    with demo.deploy("policies", only_first, backends, haproxy=lb) as deployment:
        rows.append(Row(name, "deny_from 198.18.0.10, TCP via HAProxy: that client",
                        demo.tcp_seen(f"{LB}:9000", source=CLIENT), REFUSED))
        rows.append(Row(name, "  ... another client behind the same HAProxy",
                        demo.tcp_seen(f"{LB}:9000", source=CLIENT2), CLIENT2))
        denied = demo.http(f"{LB}:8000", source=CLIENT)
        rows.append(Row(name, "  HTTP: that client", denied if isinstance(denied, str) else "200",
                        "HTTP/1.1 403 Forbidden"))
        rows.append(Row(name, "  HTTP: another client", demo.xff_client(f"{LB}:8000", 0, source=CLIENT2), CLIENT2))
        rbac_denied = deployment.envoy("ingress").stat("guarded-tcp.rbac.denied")
        rows.append(Row(name, "  stats: guarded-tcp.rbac.denied", str(rbac_denied), "1"))
        rows.append(demo.access_log_row(name, deployment, {CLIENT, CLIENT2}))
    without = _edit(only_first, ("        service: echo\n        accept_proxy_protocol: true\n        deny_from",
                                 "        service: echo\n        deny_from"),
                    ('    send_proxy_protocol: v2\n', ''))
    with demo.deploy("policies-without", without, backends,
                     haproxy=[([f"{LB}:9000"], f"{INGRESS}:9000", "")]):
        rows.append(Row(name, "  negative: no PROXY hop, the rule sees HAProxy: 198.18.0.10 gets in",
                        "in" if demo.tcp(f"{LB}:9000", source=CLIENT).startswith("backend:") else REFUSED, "in"))
    return rows


def sticky(demo: Demo) -> list[Row]:
    name = "6 sticky by client IP"
    text = example("client-ip-policies.yaml")
    backends = [("svc-b", "tcp", f"{SVC_B}:{port}") for port in (9001, 9002, 9003)]
    lb = [([f"{LB}:9100"], f"{INGRESS}:9100", "send-proxy-v2")]

    def landings() -> dict[str, set[str]]:
        return {client: {demo.tcp(f"{LB}:9100", source=client).split()[0] for _ in range(20)} for client in CLIENTS}

    rows = []
    with demo.deploy("sticky", text, backends, haproxy=lb) as deployment:
        before = landings()
        moved_around = {c: b for c, b in before.items() if len(b) != 1}
        rows.append(Row(name, "5 clients x 20 connections via HAProxy: each always on one backend",
                        "yes" if not moved_around else f"no: {moved_around}", "yes"))
        used = {next(iter(b)) for b in before.values() if len(b) == 1}
        rows.append(Row(name, "  ... and the clients spread over the backends",
                        f"{len(used)} backends" if len(used) > 1 else "all on one", f"{len(used)} backends"
                        if len(used) > 1 else "more than one"))
        # Remove the busiest backend from the topology; keepsrc pushes the new endpoints.
        busiest = max(used, key=lambda b: sum(1 for v in before.values() if v == {b}))
        address = busiest.removeprefix("backend:tcp@")
        assert deployment.topology_path is not None
        served = deployment.topology_path.read_text()
        edited = served.replace(f'"{address}", ', "").replace(f', "{address}"', "")
        deployment.topology_path.write_text(edited)
        ingress = deployment.envoy("ingress")
        ingress.wait_until(lambda: address not in ingress.admin("/clusters"), 15, f"{address} to leave EDS")
        after = landings()
        stayed = all(after[c] == b for c, b in before.items() if b != {busiest})
        moved = all(after[c] != {busiest} and len(after[c]) == 1 for c, b in before.items() if b == {busiest})
        rows.append(Row(name, f"  remove {address} from the topology: only its clients move",
                        "yes" if stayed and moved else f"no: before {before}, after {after}", "yes"))
    sticky_line = "    sticky: client_ip      # ring_hash on the client's address: one client, one backend\n"
    round_robin = _edit(text, (sticky_line, ""))
    with demo.deploy("sticky-without", round_robin, backends, haproxy=lb):
        spread = landings()
        rows.append(Row(name, "  negative: without sticky, a client's connections spread over backends",
                        "spread" if all(len(b) > 1 for b in spread.values()) else f"not spread: {spread}", "spread"))
    return rows


def sip_udp(demo: Demo) -> list[Row]:
    name = "7 UDP (SIP)"
    text = example("sip-udp.yaml")
    backends = [("svc-b", "udp", "127.0.0.1:5070")]
    rows = []
    # No access-log row here: udp_proxy logs a session when it ends (idle_timeout later).
    with demo.deploy("sip-udp", text, backends):
        rows.append(Row(name, "SIP OPTIONS -> svc-b Envoy (udp_proxy, original_src + netplan) -> SIP server",
                        demo.sip(f"{SVC_B}:5060"), CLIENT))
    with demo.deploy("sip-udp-no-netplan", text, backends, netplan=False):
        rows.append(Row(name, "  negative: no netplan: the server's answer never returns",
                        demo.sip(f"{SVC_B}:5060"), NO_ANSWER))
    without = _edit(text, ("        original_src: {placement: local}\n", ""))
    with demo.deploy("sip-udp-without", without, backends):
        rows.append(Row(name, "  negative: without original_src -> Envoy's address",
                        demo.sip(f"{SVC_B}:5060"), "127.0.0.1"))
    return rows


# -- TLS at the edge -----------------------------------------------------------------------------------
# Certificates come from a CA the demo makes for the run (DemoPki). As root the client's connection
# goes through HAProxy, which sends PROXY v2; on loopback the client writes that header itself.
def _edge(demo: Demo, port: int) -> tuple[str, str, list[tuple[list[str], str, str]], str]:
    """(where the client connects, whom its own PROXY header names, HAProxy's frontends, the path's start)."""
    if demo.network.netns:
        lb = [([f"{LB}:{port}"], f"{INGRESS}:{port}", "send-proxy-v2")]
        return f"{LB}:{port}", "", lb, "client -> HAProxy (v2)"
    return f"{INGRESS}:{port}", CLIENT, [], "client (PROXY v2 header)"


def _ingress_as_peer(demo: Demo) -> str:
    """The source address of the ingress Envoy's upstream connections, as a backend sees it."""
    return INGRESS if demo.network.netns else "127.0.0.1"


HTTPS_NAMES = ("www.demo.test", "api.demo.test")
GET_CLOSE = "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"


def _https_xff_client(demo: Demo, served: TlsReply, trusted: int) -> str:
    """The client the HTTP backend read from X-Forwarded-For, in a reply that came over TLS."""
    head, _, body = served.reply.partition("\n\n")
    if served.error or not head.startswith("HTTP/1.1 200"):
        return served.error or head.split("\n")[0]
    entries = [e.strip() for e in json.loads(body)["headers"].get("x-forwarded-for", "").split(",") if e.strip()]
    return demo.untranslate(entries[-1 - trusted]) if len(entries) > trusted else "no X-Forwarded-For"


def https_edge(demo: Demo) -> list[Row]:
    name = "8 HTTPS at the edge"
    pki = DemoPki(demo.workdir / "pki-https")
    certificates = "".join(f"            - {{cert: {cert}, key: {key}, server_names: [{sni}]}}\n"
                           for sni in HTTPS_NAMES for cert, key in [pki.issue(sni)])
    text = _edit(example("external-http.yaml"), ("address: 198.18.2.2:8000", "address: 198.18.2.2:8443"),
                 ("        protocol: http\n        accept_proxy_protocol",
                  f"        protocol: http\n        tls:\n          certificates:\n{certificates}"
                  "        accept_proxy_protocol"))
    backends = [("svc-b", "http", "127.0.0.1:8080")]
    address, header_for, lb, start = _edge(demo, 8443)
    rows = []
    with demo.deploy("https-edge", text, backends, haproxy=lb) as deployment:
        served = demo.tls(address, HTTPS_NAMES[0], pki.ca, GET_CLOSE.format(host=HTTPS_NAMES[0]), header_for)
        rows.append(Row(name, f"{start} -> ingress (TLS ends) -> svc-b -> backend (XFF)",
                        _https_xff_client(demo, served, trusted=1), CLIENT))
        for sni in HTTPS_NAMES:
            rows.append(Row(name, f"  SNI {sni}: its certificate, verified against the demo CA",
                            demo.tls(address, sni, pki.ca, proxy_header_for=header_for).certificate, f"CN={sni}"))
        rows.append(demo.access_log_row(name, deployment, {CLIENT}))
        rows.append(Row(name, "  no PROXY header to a listener that requires one: no TLS handshake",
                        demo.tls(f"{INGRESS}:8443", HTTPS_NAMES[0], pki.ca).certificate, REFUSED))
    if demo.network.netns:
        without = _edit(text, ("        accept_proxy_protocol: {versions: [v1, v2]}\n", ""))
        with demo.deploy("https-edge-without", without, backends, haproxy=[([f"{LB}:8443"], f"{INGRESS}:8443", "")]):
            served = demo.tls(f"{LB}:8443", HTTPS_NAMES[0], pki.ca, GET_CLOSE.format(host=HTTPS_NAMES[0]))
            rows.append(Row(name, "  negative: HAProxy without PROXY protocol -> HAProxy's address",
                            _https_xff_client(demo, served, trusted=1), LB))
    return rows


# Scenario 9: one tcp listener, two TLS backends picked by the name in the ClientHello. Envoy never
# decrypts, so X-Forwarded-For cannot exist; the PROXY header it sends each backend carries the client.
SNI_PASSTHROUGH = """apiVersion: keepsrc/v1
services:
  shop-a: {endpoints: ["198.18.4.2:9443"], send_proxy_protocol: v2}
  shop-b: {endpoints: ["198.18.4.2:9444"], send_proxy_protocol: v2}
proxies:
  ingress:
    listeners:
      - name: passthrough
        address: 198.18.2.2:8443
        access_log: stdout
        protocol: tcp
        accept_proxy_protocol: {versions: [v2]}
        sni_routes:
          - {server_names: [a.demo.test], service: shop-a}
          - {server_names: [b.demo.test], service: shop-b}
"""
SHOPS = {"a.demo.test": f"{SVC_B}:9443", "b.demo.test": f"{SVC_B}:9444"}


def _passthrough_client(demo: Demo, served: TlsReply, backend: str) -> str:
    """The client the TLS backend at `backend` reported ('backend:tls@ADDRESS client:IP sni:NAME ...')."""
    fields = served.reply.split()
    if served.error or len(fields) < 2:
        return served.error or "no reply"
    if fields[0] != f"backend:tls@{demo.network.translate(backend)}":
        return f"answered by {demo.untranslate(fields[0].removeprefix('backend:tls@'))}"
    return demo.untranslate(fields[1].removeprefix("client:"))


def sni_passthrough(demo: Demo) -> list[Row]:
    name = "9 SNI passthrough"
    pki = DemoPki(demo.workdir / "pki-passthrough")
    backends = [("svc-b", "tls", backend, "--cert", str(cert), "--key", str(key))
                for sni, backend in SHOPS.items() for cert, key in [pki.issue(sni)]]
    address, header_for, lb, start = _edge(demo, 8443)
    rows = []
    with demo.deploy("sni-passthrough", SNI_PASSTHROUGH, backends, haproxy=lb) as deployment:
        for sni, backend in SHOPS.items():
            served = demo.tls(address, sni, pki.ca, "hello\n", header_for)
            rows.append(Row(name, f"{start} -> ingress (SNI, v2) -> TLS backend {sni}",
                            _passthrough_client(demo, served, backend), CLIENT))
            rows.append(Row(name, "  ... served that backend's own certificate: Envoy did not decrypt",
                            served.certificate, f"CN={sni}"))
        rows.append(demo.access_log_row(name, deployment, {CLIENT}))
    plain_b = _edit(SNI_PASSTHROUGH, ('"198.18.4.2:9444"], send_proxy_protocol: v2}', '"198.18.4.2:9444"]}'))
    with demo.deploy("sni-passthrough-without", plain_b, backends, haproxy=lb):
        served = demo.tls(address, "b.demo.test", pki.ca, "hello\n", header_for)
        rows.append(Row(name, "  negative: no send_proxy_protocol to b.demo.test -> the ingress",
                        _passthrough_client(demo, served, SHOPS["b.demo.test"]), _ingress_as_peer(demo)))
    return rows


# Scenario 10: Envoy to a TLS upstream that requires PROXY protocol (nginx `listen ... ssl proxy_protocol`):
# the PROXY header goes first, in the clear, then the handshake.
TLS_UPSTREAM = """apiVersion: keepsrc/v1
services:
  secure-app:
    endpoints: ["198.18.4.2:8443"]
    send_proxy_protocol: v2
    tls: {{ca: {ca}, sni: app.demo.test}}
proxies:
  ingress:
    listeners:
      - name: public-http
        address: 198.18.2.2:8000
        access_log: stdout
        protocol: http
        accept_proxy_protocol: {{versions: [v2]}}
        xff: {{use_remote_address: true, trusted_hops: 0}}
        routes: [{{prefix: /, service: secure-app}}]
"""


def tls_upstream(demo: Demo) -> list[Row]:
    name = "10 TLS upstream"
    pki = DemoPki(demo.workdir / "pki-upstream")
    cert, key = pki.issue("app.demo.test")
    text = TLS_UPSTREAM.format(ca=pki.ca)
    address, header_for, lb, start = _edge(demo, 8000)
    request = GET_CLOSE.format(host="app.demo.test")
    rows = []
    with demo.deploy("tls-upstream", text, haproxy=lb) as deployment:
        logs = demo.start_nginx(deployment, demo.network.translate(f"{SVC_B}:8443"), NGINX_TLS_CONF,
                                cert=str(cert), key=str(key))
        reply = demo.tcp(address, request, proxy_header_for=header_for)
        answer = reply.partition("\n\n")[2].split() if reply.startswith("HTTP/1.1 200") else [reply.split("\n")[0]]
        rows.append(Row(name, f"{start} -> ingress -> nginx (ssl proxy_protocol)",
                        demo.untranslate(answer[0]), CLIENT))
        # TLS 1.2: Envoy's highest version upstream unless told otherwise.
        rows.append(Row(name, "  the hop is TLS: nginx's $ssl_protocol (Envoy verified app.demo.test)",
                        answer[-1], "TLSv1.2"))
        access_log = logs / "nginx-pp.log"
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: access_log.exists() and access_log.read_text().strip(), 5, "nginx's access log")
        logged = access_log.read_text().split()[:2] if access_log.exists() else []
        rows.append(Row(name, "  nginx's access log: $proxy_protocol_addr $remote_addr (the ingress)",
                        " ".join(demo.untranslate(a) for a in logged) or "nothing logged",
                        f"{CLIENT} {_ingress_as_peer(demo)}"))
    without = _edit(text, ("    send_proxy_protocol: v2\n", ""))
    with demo.deploy("tls-upstream-without", without, haproxy=lb) as deployment:
        logs = demo.start_nginx(deployment, demo.network.translate(f"{SVC_B}:8443"), NGINX_TLS_CONF,
                                cert=str(cert), key=str(key))
        status = demo.tcp(address, request, proxy_header_for=header_for).split("\n")[0]
        error_log = logs / "nginx-error.log"
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: "broken header" in error_log.read_text(errors="replace"), 5, "nginx's error log")
        verdict = "broken header" if "broken header" in error_log.read_text(errors="replace") else "none"
        code = status.split()[1] if status.startswith("HTTP/1.1 ") else status
        rows.append(Row(name, "  negative: no send_proxy_protocol: client's status / nginx error log",
                        f"{code} / {verdict}", "503 / broken header"))
    return rows


@contextlib.contextmanager
def _concurrently() -> Iterator[Callable[[Callable[[], str]], Callable[[], str]]]:
    """Start calls in threads; each returns a getter for its result, valid after the block."""
    import threading

    threads: list[threading.Thread] = []

    def run(call: Callable[[], str]) -> Callable[[], str]:
        result: list[str] = []
        thread = threading.Thread(target=lambda: result.append(call()))
        thread.start()
        threads.append(thread)
        return lambda: result[0] if result else "no result"

    yield run
    for thread in threads:
        thread.join(timeout=30)


# -- without root: loopback only ------------------------------------------------------------------
# Envoy writes its own address into X-Forwarded-For for a loopback peer, so on loopback the client
# plays the load balancer and names itself (198.18.0.10) in a PROXY v2 header.
def external_http_loopback(demo: Demo) -> list[Row]:
    name = "2 external HTTP"
    with demo.deploy("external-http", example("external-http.yaml"), [("svc-b", "http", "127.0.0.1:8080")]):
        return [
            Row(name, "client (PROXY v2 header) -> ingress -> svc-b -> backend",
                demo.xff_client(f"{INGRESS}:8000", trusted=1, proxy_header_for=CLIENT), CLIENT),
            Row(name, "  no PROXY header to a listener that requires one",
                demo.tcp(f"{INGRESS}:8000", "GET / HTTP/1.1\r\nHost: x\r\n\r\n"), REFUSED),
        ]


def external_tcp_loopback(demo: Demo) -> list[Row]:
    name = "4 external TCP"
    text = _edit(example("external-tcp.yaml"), ("        original_src: {mark: 1337, placement: local}\n", ""),
                 ('    endpoints: ["127.0.0.1:9000"]',
                  '    endpoints: ["127.0.0.1:9000"]\n    send_proxy_protocol: v2'))
    with demo.deploy("external-tcp-pp", text, [("svc-b", "tcp", "127.0.0.1:9000")]):
        return [Row(name, "client (PROXY v2) -> ingress (v2) -> svc-b (v2) -> backend reading PROXY protocol",
                    demo.tcp_seen(f"{INGRESS}:9000", proxy_header_for=CLIENT), CLIENT)]


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Demo], list[Row]]
    needs: tuple[str, ...] = ()  # binaries
    loopback: Callable[[Demo], list[Row]] | None = None  # what runs without namespaces, if anything
    why_netns: str = ""  # why it needs namespaces, when it has no loopback version
    loopback_needs: tuple[str, ...] = ()  # binaries the loopback version needs
    about_the_address: bool = True  # then it has a negative row: the address lost without keepsrc


SCENARIOS = (
    Scenario("1 inner HTTP", inner_http,
             why_netns="Envoy writes its own address into X-Forwarded-For for a loopback client; "
                       "a real client address needs namespaces (run as root)"),
    Scenario("2 external HTTP", external_http, needs=("haproxy",), loopback=external_http_loopback),
    Scenario("3 inner TCP", inner_tcp, needs=("iptables",),
             why_netns="original_src needs root: network namespaces, CAP_NET_ADMIN and iptables"),
    Scenario("4 external TCP", external_tcp, needs=("haproxy", "nginx", "iptables"), loopback=external_tcp_loopback),
    Scenario("5 deny by client IP", allow_deny, needs=("haproxy",),
             why_netns="needs several client addresses behind HAProxy: network namespaces (run as root)"),
    Scenario("6 sticky by client IP", sticky, needs=("haproxy",),
             why_netns="needs several client addresses behind HAProxy: network namespaces (run as root)"),
    Scenario("7 UDP (SIP)", sip_udp, needs=("iptables",),
             why_netns="original_src needs root: network namespaces, CAP_NET_ADMIN and iptables"),
    # On loopback these run without HAProxy: the client writes the PROXY v2 header itself, and 8 leaves
    # out its HAProxy-without-PROXY negative (its "no PROXY header" row stays).
    Scenario("8 HTTPS at the edge", https_edge, needs=("haproxy",), loopback=https_edge),
    Scenario("9 SNI passthrough", sni_passthrough, needs=("haproxy",), loopback=sni_passthrough),
    Scenario("10 TLS upstream", tls_upstream, needs=("haproxy", "nginx"), loopback=tls_upstream,
             loopback_needs=("nginx",)),
    # Replicas share one etcd on loopback in both modes: the rows are about failover, not addresses.
    Scenario("11 replicas on etcd", replicas, needs=("etcd",), loopback=replicas, loopback_needs=("etcd",),
             about_the_address=False),
    # Who may get which config: one keepsrc and two Envoys on the demo's hosts, in both modes.
    Scenario("12 mTLS to keepsrc", xds_mtls, loopback=xds_mtls, about_the_address=False),
)
