"""Secure xDS: mutual TLS between `keepsrc serve` and real Envoys, each Envoy served only the proxy
entry its certificate's SPIFFE ID names; certificates renewed on disk with streams kept; CSDS for
an admin identity only; plaintext only on loopback unless --insecure; unix socket permissions."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse

from keepsrc.certs import issue, write_pair, write_pki
from keepsrc.snapshots.bootstrap import XdsApi, XdsTls, XdsTransport, xds_bootstrap
from keepsrc.snapshots.render import to_dict
from keepsrc.snapshots.snapshot import CLUSTER
from keepsrc.snapshots.tls import secret_name, write_secret_file
from keepsrc.topology import SocketAddress
from keepsrc.topology.model import Certificate
from tests.support.envoy import Envoy, envoy_path, free_port
from tests.support.envoy_lab import SeqLab, http_backend, seq_lab
from tests.support.serve import Serve, until

ROOT = Path(__file__).resolve().parent.parent
TRUST_DOMAIN = "keepsrc.local"
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[SeqLab]:
    envoy_path()
    with seq_lab(tmp_path) as lab:
        yield lab


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    write_pki(directory, ["ingress", "other"], TRUST_DOMAIN)
    return directory


@pytest.fixture
def server(lab: SeqLab, pki: Path, tmp_path: Path) -> Iterator[Serve]:
    serve = Serve(tmp_path, str(lab.path), "--tls-cert", str(pki / "server.pem"), "--tls-key",
                  str(pki / "server-key.pem"), "--client-ca", str(pki / "ca.pem"), "--trust-domain", TRUST_DOMAIN)
    try:
        until(lambda: "listening on" in serve.text(), 30, "the server")
        yield serve
    finally:
        serve.stop()


def envoy_with(tmp_path: Path, serve: Serve, pki: Path, node: str, cert: str) -> Envoy:
    tls = XdsTls(str(pki / "ca.pem"), str(pki / "proxies" / f"{cert}.pem"), str(pki / "proxies" / f"{cert}-key.pem"),
                 "localhost")
    write_secret_file(tls.certificate())
    config = to_dict(xds_bootstrap(node, SocketAddress("127.0.0.1", serve.port), SocketAddress("127.0.0.1", 0),
                                   XdsApi.SOTW, XdsTransport.ADS, tls=tls))
    return Envoy(config, tmp_path, name=f"envoy-{node}-{cert}")


def dynamic_listeners(envoy: Envoy) -> list[str]:
    dump = json.loads(envoy.admin("/config_dump?resource=dynamic_listeners"))
    return [c["name"] for c in dump.get("configs", []) if "active_state" in c]


def test_an_envoy_with_its_certificate_is_served_and_carries_traffic(lab: SeqLab, pki: Path, server: Serve,
                                                                     tmp_path: Path) -> None:
    with envoy_with(tmp_path, server, pki, "ingress", "ingress") as envoy:
        envoy.wait_ready()
        until(lambda: http_backend(lab.http_port) == "A", 20, "traffic")
        assert sorted(dynamic_listeners(envoy)) == ["http-in", "tcp-in"]
        assert envoy.stat("cluster.keepsrc_xds.ssl.handshake") == 1
    assert server.metric("keepsrc_xds_denied_total") == 0


def test_a_valid_certificate_of_another_proxy_gets_nothing(lab: SeqLab, pki: Path, server: Serve,
                                                           tmp_path: Path) -> None:
    """The Envoy claims node.id ingress, and proves it is 'other': not a byte of ingress goes out."""
    with envoy_with(tmp_path, server, pki, "ingress", "other") as envoy:
        until(lambda: server.metric("keepsrc_xds_denied_total") >= 2, 30, "denials (Envoy retries)")
        assert envoy.stat("cluster_manager.cds.update_success") in (0, None)
        assert dynamic_listeners(envoy) == []
        with pytest.raises(OSError, match="PRE_INITIALIZING"):
            envoy.admin("/ready")  # 503 until it has a config
    assert ("certificate identity spiffe://keepsrc.local/keepsrc/other may not be served proxy entry 'ingress'"
            in server.text())


def _ads_request(target: str, credentials: grpc.ChannelCredentials, node: str) -> DiscoveryResponse:
    async def ask() -> DiscoveryResponse:
        options = [("grpc.ssl_target_name_override", "localhost")]
        async with grpc.aio.secure_channel(target, credentials, options) as channel:
            call = channel.stream_stream(ADS, request_serializer=DiscoveryRequest.SerializeToString,
                                         response_deserializer=DiscoveryResponse.FromString)()
            await call.write(DiscoveryRequest(node=Node(id=node), type_url=CLUSTER))
            response = await asyncio.wait_for(call.read(), 10)
            call.cancel()
            assert isinstance(response, DiscoveryResponse), response
            return response
    return asyncio.run(ask())


def test_no_certificate_fails_the_handshake(pki: Path, server: Serve) -> None:
    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as error:
        _ads_request(f"127.0.0.1:{server.port}", credentials, "ingress")
    assert error.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_certificate_with_two_spiffe_ids_is_refused(pki: Path, server: Serve, tmp_path: Path) -> None:
    """One of its two IDs is the right one: a naive "any SAN matches" check would serve it."""
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    from cryptography.hazmat.primitives import serialization

    ca_key = serialization.load_pem_private_key((pki / "ca-key.pem").read_bytes(), password=None)
    cert, key = issue(ca, ca_key, "two", uris=[f"spiffe://{TRUST_DOMAIN}/keepsrc/ingress",  # type: ignore[arg-type]
                                               f"spiffe://{TRUST_DOMAIN}/keepsrc/other"])
    write_pair(tmp_path, "two", cert, key)
    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), (tmp_path / "two-key.pem").read_bytes(),
                                               (tmp_path / "two.pem").read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as error:
        _ads_request(f"127.0.0.1:{server.port}", credentials, "ingress")
    assert error.value.code() is grpc.StatusCode.PERMISSION_DENIED
    # ...while the proxy's own certificate is served.
    proxies = pki / "proxies"
    own = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), (proxies / "ingress-key.pem").read_bytes(),
                                       (proxies / "ingress.pem").read_bytes())
    assert _ads_request(f"127.0.0.1:{server.port}", own, "ingress").type_url == CLUSTER


def test_renewed_certificates_keep_the_stream_and_the_config(lab: SeqLab, pki: Path, server: Serve,
                                                             tmp_path: Path) -> None:
    with envoy_with(tmp_path, server, pki, "ingress", "ingress") as envoy:
        envoy.wait_ready()
        until(lambda: http_backend(lab.http_port) == "A", 20, "traffic")
        before = {name: envoy.stat(name) for name in (
            "cluster.keepsrc_xds.upstream_cx_total", "cluster_manager.cds.update_success",
            "listener_manager.lds.update_success")}
        old_serial = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes()).serial_number
        write_pki(pki, ["ingress", "other"], TRUST_DOMAIN)  # renews the server's and every Envoy's certificate
        assert x509.load_pem_x509_certificate((pki / "server.pem").read_bytes()).serial_number != old_serial
        # Envoy picks its renewed certificate up through the SDS file's watched directory: the
        # expiry it reports for its own certificate is the renewed one's.
        renewed = x509.load_pem_x509_certificate((pki / "proxies" / "ingress.pem").read_bytes())
        own = secret_name(Certificate(str(pki / "proxies" / "ingress.pem"), str(pki / "proxies" / "ingress-key.pem")))
        expiry = f"cluster.keepsrc_xds.ssl.certificate.{own}.expiration_unix_time_seconds"
        until(lambda: envoy.stat(expiry) == int(renewed.not_valid_after_utc.timestamp()), 20,
              "Envoy's certificate update")
        assert (envoy.stat("cluster.keepsrc_xds.client_ssl_socket_factory.ssl_context_update_by_sds") or 0) >= 2
        # keepsrc hands the renewed one to the next connection: `keepsrc status` as the admin.
        status = subprocess.run(
            [sys.executable, "-m", "keepsrc", "status", "--xds", f"127.0.0.1:{server.port}", "--tls-ca",
             str(pki / "ca.pem"), "--tls-cert", str(pki / "admin.pem"), "--tls-key", str(pki / "admin-key.pem"),
             "--tls-server-name", "localhost"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert status.returncode == 0, status.stderr
        assert "ingress (cluster ingress)" in status.stdout
        assert "TLS: " in server.text() and "changed; new connections get the renewed certificate" in server.text()
        # The stream and the config stayed: no new connection, nothing applied again, traffic on.
        assert {name: envoy.stat(name) for name in before} == before
        assert envoy.stat("control_plane.connected_state") == 1
        assert http_backend(lab.http_port) == "A"


def test_status_is_for_the_admin_identity_only(pki: Path, server: Serve) -> None:
    def status(cert: str, key: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keepsrc", "status", "--xds", f"127.0.0.1:{server.port}", "--tls-ca",
             str(pki / "ca.pem"), "--tls-cert", cert, "--tls-key", key, "--tls-server-name", "localhost"],
            capture_output=True, text=True, timeout=60, cwd=ROOT)

    admin = status(str(pki / "admin.pem"), str(pki / "admin-key.pem"))
    assert admin.returncode == 0, admin.stderr
    proxy = status(str(pki / "proxies" / "ingress.pem"), str(pki / "proxies" / "ingress-key.pem"))
    assert proxy.returncode == 2
    assert "keepsrc-admin only" in proxy.stderr


def test_plaintext_beyond_loopback_needs_insecure(lab: SeqLab, tmp_path: Path) -> None:
    refused = subprocess.run([sys.executable, "-m", "keepsrc", "serve", str(lab.path), "--listen", "0.0.0.0:0"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2
    assert "reachable from the network" in refused.stderr and "--insecure" in refused.stderr
    serve = Serve(tmp_path, str(lab.path), "--listen", f"0.0.0.0:{free_port()}", "--insecure")
    try:
        until(lambda: "listening on" in serve.text(), 30, "the server")
        assert "serving PLAINTEXT on 0.0.0.0" in serve.text()
    finally:
        assert serve.stop() == 0


def test_unix_socket_gets_an_explicit_mode(lab: SeqLab, tmp_path: Path) -> None:
    socket = tmp_path / "xds.sock"
    old = os.umask(0)  # a umask that would leave the socket open to everyone
    try:
        serve = Serve(tmp_path, str(lab.path), f"--listen=unix:{socket}")
    finally:
        os.umask(old)
    try:
        until(lambda: "listening on" in serve.text(), 30, "the server")
        assert stat.S_IMODE(socket.stat().st_mode) == 0o660
    finally:
        serve.stop()


def test_an_entry_may_name_a_fleet_identity(lab: SeqLab, pki: Path, server: Serve, tmp_path: Path) -> None:
    """`identities` on a proxy entry: Envoys sharing one fleet certificate are served that entry."""
    write_pki(pki, ["fleet"], TRUST_DOMAIN)
    fleet = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(),
                                         (pki / "proxies" / "fleet-key.pem").read_bytes(),
                                         (pki / "proxies" / "fleet.pem").read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as error:
        _ads_request(f"127.0.0.1:{server.port}", fleet, "ingress")
    assert error.value.code() is grpc.StatusCode.PERMISSION_DENIED
    text = lab.path.read_text().replace(
        "  ingress:\n    listeners:",
        f"  ingress:\n    identities: [spiffe://{TRUST_DOMAIN}/keepsrc/fleet]\n    listeners:")
    lab.path.write_text(text)

    def served() -> bool:
        try:
            return _ads_request(f"127.0.0.1:{server.port}", fleet, "ingress").type_url == CLUSTER
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.PERMISSION_DENIED, exc  # until every worker reloaded
            return False

    until(served, 20, "the fleet identity served after the reload")
