"""Mutual TLS between `keepsrc serve` and the demo's Envoys: on by default for every scenario (XdsPki),
and scenario 12, which shows who gets what.

XdsPki is `keepsrc certs` for one deployment: a CA, keepsrc's certificate (localhost: the Envoys
reach keepsrc on a unix socket and check that name) and one certificate per proxy entry, whose
SPIFFE ID spiffe://keepsrc.local/keepsrc/<entry> is what keepsrc serves that entry to. gRPC and
Envoy both do TLS over a unix socket (a pipe address) as over TCP.

Scenario 12: the right certificate gets its config and the client's traffic flows; another entry's
valid certificate gets nothing (keepsrc counts the denial); no certificate, no handshake; renewed
certificates (write_pki again) are picked up with the streams and the config kept.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keepsrc.certs import write_pki
from keepsrc.demo.envoy import Envoy
from keepsrc.demo.netns import wait_for
from keepsrc.server.auth import DEFAULT_TRUST_DOMAIN
from keepsrc.snapshots.bootstrap import XdsTls, xds_bootstrap
from keepsrc.snapshots.render import to_dict
from keepsrc.snapshots.tls import write_secret_file
from keepsrc.topology import SocketAddress

if TYPE_CHECKING:
    from keepsrc.demo.scenarios import Demo, Deployment, Row

NAME = "12 mTLS to keepsrc"
SERVER_NAME = "localhost"  # in keepsrc's certificate (write_pki's default names); the Envoys check it
# What moves when Envoy applies anything from its control plane, and when its xDS connection is new.
UPDATES = ("cluster_manager.cds.update_success", "listener_manager.lds.update_success",
           "listener_manager.listener_modified", "listener_manager.listener_added",
           "cluster_manager.cluster_modified", "cluster_manager.cluster_added")
XDS_CONNECTIONS = "cluster.keepsrc_xds.upstream_cx_total"
SDS_RELOADS = "cluster.keepsrc_xds.client_ssl_socket_factory.ssl_context_update_by_sds"


@dataclass(frozen=True)
class XdsPki:
    """The files `keepsrc certs DIRECTORY --proxy ENTRY...` writes, and what serve and each Envoy need of them."""

    directory: Path
    proxies: list[str]
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def write(self) -> None:
        """Write them, or renew every certificate under the same CA (as `keepsrc certs` run again)."""
        write_pki(self.directory, self.proxies, self.trust_domain)

    def serve_arguments(self) -> list[str]:
        return ["--tls-cert", str(self.directory / "server.pem"), "--tls-key", str(self.directory / "server-key.pem"),
                "--client-ca", str(self.ca), "--trust-domain", self.trust_domain]

    def envoy_tls(self, entry: str) -> XdsTls:
        """An Envoy's side, with `entry`'s certificate; writes the SDS file its bootstrap points at."""
        proxies = self.directory / "proxies"
        tls = XdsTls(str(self.ca), str(proxies / f"{entry}.pem"), str(proxies / f"{entry}-key.pem"), SERVER_NAME)
        write_secret_file(tls.certificate())
        return tls

    def credentials(self, stem: str | None = "admin") -> grpc.ChannelCredentials:
        """A gRPC client's: the admin's certificate (or another, by stem), or None: the CA only."""
        if stem is None:
            return grpc.ssl_channel_credentials(self.ca.read_bytes())
        key, cert = (self.directory / f"{stem}-key.pem"), (self.directory / f"{stem}.pem")
        return grpc.ssl_channel_credentials(self.ca.read_bytes(), key.read_bytes(), cert.read_bytes())

    def server_serial(self) -> int:
        return x509.load_pem_x509_certificate((self.directory / "server.pem").read_bytes()).serial_number


def health(socket_path: Path, credentials: grpc.ChannelCredentials | None) -> str:
    """keepsrc's gRPC health over its unix socket: SERVING, or the status code of the failure."""
    target = f"unix:{socket_path}"
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    channel = grpc.secure_channel(target, credentials, options) if credentials else grpc.insecure_channel(target)
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as exc:
        return str(exc.code().name)  # type: ignore[attr-defined]
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def served_serial(socket_path: Path, pki: XdsPki) -> int:
    """The serial of the certificate keepsrc presents to a new connection (as the admin, HTTP/2)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.directory / "admin.pem"), str(pki.directory / "admin-key.pem"))
    context.set_alpn_protocols(["h2"])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(5)
        raw.connect(str(socket_path))
        with context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def dynamic_listeners(envoy: Envoy) -> list[str]:
    dump = json.loads(envoy.admin("/config_dump?resource=dynamic_listeners"))
    return [c["name"] for c in dump.get("configs", [])]


def _counters(envoy: Envoy) -> dict[str, int]:
    return {name: envoy.stat(name) or 0 for name in (XDS_CONNECTIONS, *UPDATES)}


def xds_mtls(demo: Demo) -> list[Row]:
    from keepsrc.demo.scenarios import CLIENT, INGRESS, Row, _edit, example  # they import this module

    # Scenario 4's path without original_src (so it needs no netplan): the client plays the load
    # balancer and names itself in a PROXY v2 header; svc-b hands it on to the backend in another.
    text = _edit(example("external-tcp.yaml"), ("        original_src: {mark: 1337, placement: local}\n", ""),
                 ('    endpoints: ["127.0.0.1:9000"]',
                  '    endpoints: ["127.0.0.1:9000"]\n    send_proxy_protocol: v2'))
    rows: list[Row] = []
    with demo.deploy("xds-mtls", text, [("svc-b", "tcp", "127.0.0.1:9000")], metrics=True) as deployment:
        pki, socket_path = deployment.pki, deployment.socket_path
        assert pki is not None and socket_path is not None and deployment.metrics_port is not None
        rows.append(Row(NAME, "client (PROXY v2) -> ingress -> svc-b -> backend, xDS over mutual TLS",
                        demo.tcp_seen(f"{INGRESS}:9000", proxy_header_for=CLIENT), CLIENT))
        envoys = len(deployment.envoys)
        tls = [e for e in deployment.envoys
               if (e.stat("cluster.keepsrc_xds.ssl.handshake") or 0) >= 1 and e.stat("control_plane.connected_state")]
        rows.append(Row(NAME, "  Envoys on TLS xDS, each with its own entry's certificate",
                        f"{len(tls)} of {envoys}", f"{envoys} of {envoys}"))
        rows.append(_impostor(demo, deployment, pki, socket_path, deployment.metrics_port))
        rows.append(Row(NAME, "  no client certificate: no TLS handshake (keepsrc's gRPC health)",
                        health(socket_path, pki.credentials(None)), "UNAVAILABLE"))
        rows.append(Row(NAME, "  plaintext: no TLS handshake", health(socket_path, None), "UNAVAILABLE"))
        rows.append(Row(NAME, "  ... while the admin's certificate is answered", health(socket_path, pki.credentials()),
                        "SERVING"))
        rows += _renewal(demo, deployment, pki, socket_path)
    return rows


def _impostor(demo: Demo, deployment: Deployment, pki: XdsPki, socket_path: Path, metrics_port: int) -> Row:
    """An Envoy that says it is the ingress and proves it is svc-b: not a byte of ingress goes out."""
    from keepsrc.demo.scenarios import Row

    bootstrap = xds_bootstrap("ingress", PurePosixPath(socket_path), SocketAddress("127.0.0.1", 0),
                              tls=pki.envoy_tls("svc-b"))
    envoy = Envoy(to_dict(bootstrap), demo.workdir, name="xds-mtls-impostor")
    denied_before = metric(metrics_port, "keepsrc_xds_denied_total")
    try:
        envoy.start()
        with contextlib.suppress(TimeoutError):  # the row says what was (not) seen
            wait_for(lambda: metric(metrics_port, "keepsrc_xds_denied_total") > denied_before, 20, "the denial")
        listeners = len(dynamic_listeners(envoy))
        clusters = envoy.stat("cluster_manager.cds.update_success") or 0
    finally:
        envoy.stop()
    assert deployment.server_log is not None
    logged = "may not be served proxy entry 'ingress'" in deployment.server_log.read_text(errors="replace")
    denied = metric(metrics_port, "keepsrc_xds_denied_total") > denied_before
    got = "nothing" if listeners == clusters == 0 else f"{listeners} listeners, {clusters} CDS updates"
    verdict = "denied" if denied and logged else "not denied" if not denied else "denial not logged"
    return Row(NAME, "  an Envoy as node ingress with svc-b's valid certificate: gets / keepsrc",
               f"{got} / {verdict}", "nothing / denied")


def _renewal(demo: Demo, deployment: Deployment, pki: XdsPki, socket_path: Path) -> list[Row]:
    from keepsrc.demo.scenarios import CLIENT, INGRESS, Row

    envoys = deployment.envoys
    before = {e.name: _counters(e) for e in envoys}
    sds_before = {e.name: e.stat(SDS_RELOADS) or 0 for e in envoys}
    old_serial = pki.server_serial()
    pki.write()  # every certificate renewed: keepsrc's and each Envoy's

    def reloaded() -> list[Envoy]:
        return [e for e in envoys if (e.stat(SDS_RELOADS) or 0) > sds_before[e.name]]

    with contextlib.suppress(TimeoutError):
        wait_for(lambda: len(reloaded()) == len(envoys), 20, "the Envoys to load their renewed certificates")
    serial = served_serial(socket_path, pki)
    served = "renewed" if serial == pki.server_serial() else "the old one" if serial == old_serial else "another"
    rows = [
        Row(NAME, "  renew all certificates (write_pki again): Envoys that load theirs (SDS)",
            f"{len(reloaded())} of {len(envoys)}", f"{len(envoys)} of {len(envoys)}"),
        Row(NAME, "  ... keepsrc's certificate on a new connection", served, "renewed"),
        Row(NAME, "  ... traffic after the renewal", demo.tcp_seen(f"{INGRESS}:9000", proxy_header_for=CLIENT),
            CLIENT),
    ]
    after = {e.name: _counters(e) for e in envoys}
    reconnected = sum(after[n][XDS_CONNECTIONS] - before[n][XDS_CONNECTIONS] for n in before)
    applied = sum(after[n][u] - before[n][u] for n in before for u in UPDATES)
    rows.append(Row(NAME, "  ... streams and config kept: xDS reconnections / updates applied",
                    f"{reconnected} / {applied}", "0 / 0"))
    return rows
