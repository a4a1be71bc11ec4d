"""TLS at the edge with the client address kept, on real Envoys over ADS (SotW and delta).

Certificates are made here for each run (a CA, and leaves it signs), never checked in. What a
user would notice is asserted: the certificate a real TLS client is served, which backend an SNI
name reaches, the client address each backend (and nginx) reports, a certificate renewed on disk
while clients keep connecting, and the file:line findings for broken certificate files.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keepsrc.demo.backends import HttpBackend, TlsBackend, proxy_v2_header
from keepsrc.demo.nginx import nginx_conf
from keepsrc.explain import explain, render_text
from keepsrc.snapshots.bootstrap import static_bootstrap
from keepsrc.snapshots.render import to_dict
from keepsrc.snapshots.tls import write_secret_files
from keepsrc.topology import SocketAddress, check_topology, load_topology
from tests.support.envoy import Envoy, envoy_path, free_port
from tests.support.envoy_lab import ADS_FLAVOURS, Traffic, XdsServerThread, envoy_for, stat0
from tests.support.strict import require_binary

CLIENT = "198.18.0.10"  # the client a load balancer in front names in its PROXY header
DENIED = "198.18.0.66"


# -- certificates -----------------------------------------------------------------------------------
def _write(path: Path, data: bytes) -> None:
    """As a renewal tool does: the new file appears by a rename, never half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Pki:
    """A throwaway CA in `directory`, and leaf certificates it signs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name("keepsrc test CA")).issuer_name(_name("keepsrc test CA"))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, sans: list[str], directory: Path | None = None,
              valid: datetime.timedelta = datetime.timedelta(days=1)) -> tuple[Path, Path, int]:
        """(cert, key, serial) for `sans`, written to `directory`/<cn>.pem and <cn>.key; `valid` < 0: expired."""
        directory = directory or self.directory
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        not_after = now + valid
        cert = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(min(now, not_after) - datetime.timedelta(days=1)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{cn}.pem", directory / f"{cn}.key"
        # Key first, then certificate: the order in which a renewal leaves a mismatched pair for a moment.
        _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path, cert.serial_number


def install_as_kubernetes_does(pki: Pki, directory: Path, version: str) -> tuple[Path, Path, int]:
    """A Kubernetes secret volume's layout: tls.crt and tls.key are links through `..data`, a link
    to the current version's directory; a renewal swaps `..data` with one rename, so the pair
    changes at once. Returns (cert, key, serial) as the topology names them."""
    cert, key, serial = pki.issue("rotate.test", ["rotate.test"], directory / version)
    switch_kubernetes_version(directory, version)
    for link, target in ((directory / "tls.crt", cert), (directory / "tls.key", key)):
        if not link.is_symlink():
            link.symlink_to(Path("..data") / target.name)
    return directory / "tls.crt", directory / "tls.key", serial


def switch_kubernetes_version(directory: Path, version: str) -> None:
    staged = directory / "..data_tmp"
    staged.symlink_to(version)
    os.replace(staged, directory / "..data")


# -- clients ----------------------------------------------------------------------------------------
@dataclass
class Served:
    subject: str  # CN of the certificate the client was served
    serial: int
    alpn: str | None
    reply: bytes


def tls_exchange(port: int, sni: str, ca: Path, payload: bytes = b"", proxy_from: str | None = None,
                 alpn: tuple[str, ...] = ("http/1.1",), check_name: bool = True) -> Served:
    """One TLS connection to Envoy on loopback, verified against `ca`, optionally behind a PROXY v2 header."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = check_name
    context.set_alpn_protocols(list(alpn))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        if proxy_from is not None:
            raw.sendall(proxy_v2_header(proxy_from, "198.18.2.2", 40000, 443))
        with context.wrap_socket(raw, server_hostname=sni) as conn:
            der = conn.getpeercert(binary_form=True)
            assert der is not None
            cert = x509.load_der_x509_certificate(der)
            reply = b""
            if payload:
                conn.sendall(payload)
                while chunk := conn.recv(65536):
                    reply += chunk
            cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            return Served(str(cn), cert.serial_number, conn.selected_alpn_protocol(), reply)


def https_get(port: int, sni: str, ca: Path, proxy_from: str | None = None, path: str = "/") -> tuple[int, bytes]:
    request = f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode()
    reply = tls_exchange(port, sni, ca, request, proxy_from).reply
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def http_get_from(source: str, port: int, path: str) -> tuple[int, bytes]:
    """Plain HTTP to Envoy from loopback address `source`, so a backend can tell the client from Envoy."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# -- nginx: requires a PROXY header, then TLS, and a client certificate ------------------------------
NGINX_TLS_CONF = nginx_conf("""\
    server {{
        listen 127.0.0.1:{port} ssl proxy_protocol;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        location / {{ return 200 "$proxy_protocol_addr $remote_addr $ssl_client_s_dn\\n"; }}
    }}
""")


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Pki]]:
    binary = require_binary("nginx")
    directory = tmp_path_factory.mktemp("nginx")
    pki = Pki(directory)
    cert, key, _ = pki.issue("upstream.test", ["upstream.test"])
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_TLS_CONF.format(dir=directory, port=port, cert=cert, key=key, ca=pki.ca))
    proc = subprocess.Popen([binary, "-p", str(directory), "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc)
        yield port, pki
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''!r}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            subprocess.run(["sleep", "0.05"], check=True)
    raise TimeoutError(f"nothing listens on {port}")


# -- the topology and the lab -------------------------------------------------------------------------
@dataclass
class Lab:
    pki: Pki
    envoy: Envoy
    https: int
    rotate: int
    passthrough: int
    to_nginx: int
    rotate_dir: Path
    http_backends: tuple[HttpBackend, HttpBackend]
    tls_backends: dict[str, TlsBackend]


def topology_text(pki: Pki, ports: dict[str, int], web: list[int], tls_backends: dict[str, TlsBackend],
                  nginx_port: int, nginx_ca: Path, client: tuple[Path, Path], rotate: tuple[Path, Path]) -> str:
    a_cert, a_key, _ = pki.issue("a.test", ["a.test"])
    d_cert, d_key, _ = pki.issue("default.test", ["default.test"])
    backend = {name: f"127.0.0.1:{b.port}" for name, b in tls_backends.items()}
    return f"""apiVersion: keepsrc/v1
services:
  web: {{endpoints: ["127.0.0.1:{web[0]}", "127.0.0.1:{web[1]}"], sticky: client_ip}}
  pt-a: {{endpoints: ["{backend['pt-a']}"], send_proxy_protocol: v2}}
  pt-b: {{endpoints: ["{backend['pt-b']}"], send_proxy_protocol: v2}}
  pt-default: {{endpoints: ["{backend['pt-default']}"], send_proxy_protocol: v2}}
  nginx-tls:
    endpoints: ["127.0.0.1:{nginx_port}"]
    send_proxy_protocol: v2
    tls:
      ca: {nginx_ca}
      sni: upstream.test
      client_certificate: {{cert: {client[0]}, key: {client[1]}}}
  nginx-tls-without-proxy-header:
    endpoints: ["127.0.0.1:{nginx_port}"]
    tls: {{ca: {nginx_ca}, sni: upstream.test, client_certificate: {{cert: {client[0]}, key: {client[1]}}}}}
proxies:
  ingress:
    listeners:
      - name: https
        address: 127.0.0.1:{ports['https']}
        protocol: http
        accept_proxy_protocol: true
        tls:
          certificates:
            - {{cert: {a_cert}, key: {a_key}, server_names: [a.test]}}
            - {{cert: {d_cert}, key: {d_key}}}
          min_version: "1.3"
        xff: {{}}
        deny_from: [{DENIED}]
        routes: [{{prefix: /, service: web}}]
      - name: https-rotate
        address: 127.0.0.1:{ports['rotate']}
        protocol: http
        tls: {{certificates: [{{cert: {rotate[0]}, key: {rotate[1]}}}]}}
        routes: [{{prefix: /, service: web}}]
      - name: passthrough
        address: 127.0.0.1:{ports['passthrough']}
        protocol: tcp
        accept_proxy_protocol: true
        sni_routes:
          - {{server_names: [a.pass.test], service: pt-a}}
          - {{server_names: ["*.b.test"], service: pt-b}}
        service: pt-default
      - name: to-nginx
        address: 127.0.0.1:{ports['to_nginx']}
        protocol: http
        routes:
          - {{prefix: /without-proxy-header, service: nginx-tls-without-proxy-header}}
          - {{prefix: /, service: nginx-tls}}
"""


@pytest.fixture(scope="module", params=ADS_FLAVOURS)
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        nginx: tuple[int, Pki]) -> Iterator[Lab]:
    envoy_path()
    directory = tmp_path_factory.mktemp(f"tls-{request.param}")
    pki = Pki(directory)
    nginx_port, nginx_pki = nginx
    client_cert, client_key, _ = nginx_pki.issue("envoy-client", ["envoy-client"], directory / "client")
    rotate_dir = directory / "rotate"
    rot_cert, rot_key = install_as_kubernetes_does(pki, rotate_dir, "v1")[:2]
    tls_backends = {
        name: TlsBackend(str(cert), str(key), name=name)
        for name, (cert, key, _) in (
            ("pt-a", pki.issue("a.pass.test", ["a.pass.test"])),
            ("pt-b", pki.issue("b.test", ["*.b.test"])),
            ("pt-default", pki.issue("fallback.test", ["fallback.test"])),
        )
    }
    web = (HttpBackend(name="web-1"), HttpBackend(name="web-2"))
    ports = {name: free_port() for name in ("https", "rotate", "passthrough", "to_nginx")}
    path = directory / "topology.yaml"
    path.write_text(topology_text(pki, ports, [w.port for w in web], tls_backends, nginx_port, nginx_pki.ca,
                                  (client_cert, client_key), (rot_cert, rot_key)))
    try:
        with XdsServerThread(path) as server:
            envoy = envoy_for(directory, server.port, request.param).start()
            try:
                envoy.wait_ready()
                # Each listener becomes active once Envoy has read its certificates.
                envoy.wait_until(lambda: tls_exchange(ports["rotate"], "rotate.test", pki.ca).subject == "rotate.test"
                                 and tls_exchange(ports["https"], "a.test", pki.ca, proxy_from=CLIENT).subject
                                 == "a.test", what="the TLS listeners")
                yield Lab(pki, envoy, ports["https"], ports["rotate"], ports["passthrough"], ports["to_nginx"],
                          rotate_dir, web, tls_backends)
            finally:
                envoy.stop()
    finally:
        for backend in (*web, *tls_backends.values()):
            backend.close()


# -- termination ------------------------------------------------------------------------------------
def test_https_serves_the_certificate_for_the_sni_name(lab: Lab) -> None:
    assert tls_exchange(lab.https, "a.test", lab.pki.ca, proxy_from=CLIENT).subject == "a.test"
    # A name no certificate lists gets the default certificate (the client then refuses its name).
    default = tls_exchange(lab.https, "other.test", lab.pki.ca, proxy_from=CLIENT, check_name=False)
    assert default.subject == "default.test"
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_exchange(lab.https, "other.test", lab.pki.ca, proxy_from=CLIENT)


def test_https_negotiates_h2_and_http1_and_refuses_tls_below_min_version(lab: Lab) -> None:
    assert tls_exchange(lab.https, "a.test", lab.pki.ca, proxy_from=CLIENT, alpn=("h2", "http/1.1")).alpn == "h2"
    assert tls_exchange(lab.https, "a.test", lab.pki.ca, proxy_from=CLIENT, alpn=("http/1.1",)).alpn == "http/1.1"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(lab.pki.ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # the listener's min_version is 1.3
    with socket.create_connection(("127.0.0.1", lab.https), timeout=5) as raw:
        raw.sendall(proxy_v2_header(CLIENT, "198.18.2.2", 40000, 443))
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="a.test")


def test_decrypted_requests_keep_the_client_address(lab: Lab) -> None:
    status, body = https_get(lab.https, "a.test", lab.pki.ca, proxy_from=CLIENT)
    assert status == 200
    seen = json.loads(body)
    # The PROXY header named the client; Envoy appended it to X-Forwarded-For after decrypting.
    assert seen["headers"]["x-forwarded-for"] == CLIENT
    assert seen["headers"]["x-forwarded-proto"] == "https"
    # A forged X-Forwarded-For inside the encryption is not believed (trusted_hops 0).
    forged = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 198.18.9.9\r\nConnection: close\r\n\r\n"
    reply = tls_exchange(lab.https, "a.test", lab.pki.ca, forged, proxy_from=CLIENT).reply
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["headers"]["x-envoy-external-address"] == CLIENT
    # deny_from acts on the client the PROXY header named, not on the load balancer.
    assert https_get(lab.https, "a.test", lab.pki.ca, proxy_from=DENIED)[0] == 403


def test_sticky_hashes_the_decrypted_client(lab: Lab) -> None:
    def backend(client: str) -> str:
        return str(json.loads(https_get(lab.https, "a.test", lab.pki.ca, proxy_from=client)[1])["backend"])

    assert len({backend(CLIENT) for _ in range(8)}) == 1
    # Clients are spread over both backends (all 16 on one: a chance of 2 in 65,536).
    assert {backend(f"198.18.0.{n}") for n in range(20, 36)} == {"web-1", "web-2"}


def test_renewed_certificate_is_used_without_a_drain(lab: Lab) -> None:
    old = tls_exchange(lab.rotate, "rotate.test", lab.pki.ca).serial
    modified = stat0(lab.envoy, "listener_manager.listener_modified")
    updates_stat = f"listener.127.0.0.1_{lab.rotate}.server_ssl_socket_factory.ssl_context_update_by_sds"
    updates = stat0(lab.envoy, updates_stat)
    # The renewed pair is ready beside the current one before clients start; the renewal itself is
    # the one rename of `..data`, while they keep connecting.
    new = lab.pki.issue("rotate.test", ["rotate.test"], lab.rotate_dir / "v2")[2]
    with Traffic(lambda: str(tls_exchange(lab.rotate, "rotate.test", lab.pki.ca).serial),
                 accept=lambda serial: int(serial) in (old, new)) as traffic:
        lab.envoy.wait_until(lambda: len(traffic.answers) > 5, what="handshakes before the renewal")
        switch_kubernetes_version(lab.rotate_dir, "v2")
        try:
            lab.envoy.wait_until(lambda: traffic.answers and traffic.answers[-1] == str(new),
                                 what="the new certificate")
        except TimeoutError as exc:
            raise AssertionError(lab.envoy.admin("/stats?filter=sds|ssl_context|listener_manager")) from exc
        answered = len(traffic.answers)
        lab.envoy.wait_until(lambda: len(traffic.answers) > answered + 5, what="more handshakes")
    assert traffic.failures == []
    assert traffic.answers[-1] == str(new)
    assert stat0(lab.envoy, "listener_manager.listener_modified") == modified
    assert stat0(lab.envoy, "listener_manager.total_listeners_draining") == 0
    assert stat0(lab.envoy, updates_stat) > updates


# -- SNI passthrough ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("sni", "backend"), [("a.pass.test", "pt-a"), ("x.b.test", "pt-b"),
                                              ("fallback.test", "pt-default")])
def test_sni_passthrough_reaches_the_backend_with_the_client_address(lab: Lab, sni: str, backend: str) -> None:
    served = tls_exchange(lab.passthrough, sni, lab.pki.ca, b"hello\n", proxy_from=CLIENT)
    # The backend's own certificate: Envoy did not decrypt. Its PROXY header carried the client.
    assert served.reply == f"backend:{backend} client:{CLIENT} sni:{sni} hello\n".encode()
    # Both addresses are those of the PROXY header Envoy read: the client, and the address it connected to.
    assert lab.tls_backends[backend].seen[-1].proxy_header == f"v2 {CLIENT} 198.18.2.2"


# -- TLS to an upstream behind a PROXY header ----------------------------------------------------------
def test_tls_upstream_after_a_proxy_header_reaches_nginx(lab: Lab) -> None:
    status, body = http_get_from("127.0.0.2", lab.to_nginx, "/")
    assert status == 200, body
    proxy_protocol_addr, remote_addr, client_dn = body.decode().split()
    assert proxy_protocol_addr == "127.0.0.2"  # the client's own address, from the PROXY header
    assert remote_addr == "127.0.0.1"  # Envoy's: the TCP peer nginx saw
    assert client_dn == "CN=envoy-client"  # nginx verified Envoy's client certificate
    # Negative: the same TLS service without the PROXY header: nginx reads the ClientHello as a
    # broken PROXY header and closes, so Envoy answers 503 itself.
    assert http_get_from("127.0.0.2", lab.to_nginx, "/without-proxy-header")[0] == 503


# -- static render ------------------------------------------------------------------------------------
def test_static_render_with_tls_is_valid_envoy_config(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cert, key, _ = pki.issue("edge.test", ["edge.test"])
    text = f"""apiVersion: keepsrc/v1
services:
  app: {{endpoints: ["127.0.0.1:9000"], send_proxy_protocol: v1, tls: {{ca: {pki.ca}, sni: app.test}}}}
proxies:
  edge:
    listeners:
      - {{name: https, address: 127.0.0.1:8443, protocol: http, routes: [{{prefix: /, service: app}}],
         tls: {{certificates: [{{cert: {cert}, key: {key}}}], alpn: [http/1.1], min_version: "1.3"}}}}
      - {{name: pass, address: 127.0.0.1:9443, protocol: tcp, sni_routes: [{{server_names: [a.test], service: app}}]}}
"""
    (tmp_path / "t.yaml").write_text(text)
    topology = load_topology(tmp_path / "t.yaml")
    config = to_dict(static_bootstrap(topology, "edge", SocketAddress("127.0.0.1", 0)))
    assert not Path(f"{cert}.keepsrc-sds.json").exists()  # builders only name the file...
    assert write_secret_files(topology) == [f"{cert}.keepsrc-sds.json"]  # ...the edge writes it
    (tmp_path / "envoy.json").write_text(json.dumps(config))
    result = subprocess.run([envoy_path(), "--mode", "validate", "--disable-hot-restart", "-c",
                             str(tmp_path / "envoy.json")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    # The SDS file Envoy reads the certificate through, beside the certificate.
    sds = json.loads(Path(f"{cert}.keepsrc-sds.json").read_text())
    assert sds["resources"][0]["tls_certificate"]["certificate_chain"] == {"filename": str(cert)}
    assert sds["resources"][0]["tls_certificate"]["watched_directory"] == {"path": str(tmp_path)}


# -- bad certificate files -----------------------------------------------------------------------------
def _findings(tmp_path: Path, certificates: str) -> list[str]:
    text = f"""apiVersion: keepsrc/v1
services:
  web: {{endpoints: ["127.0.0.1:8080"]}}
proxies:
  edge:
    listeners:
      - name: https
        address: 127.0.0.1:8443
        protocol: http
        routes: [{{prefix: /, service: web}}]
        tls:
          certificates:
{certificates}"""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    topology, diagnostics = check_topology(path)
    assert topology is None
    return [str(d).removeprefix(f"{path}:") for d in diagnostics]


def _col(line: str, token: str) -> int:
    return line.index(token) + 1


def test_bad_certificate_files_are_reported_at_their_line(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cert, key, _ = pki.issue("good.test", ["good.test"])
    other_cert, other_key, _ = pki.issue("other.test", ["other.test"])
    old_cert, old_key, _ = pki.issue("old.test", ["old.test"], valid=datetime.timedelta(days=-2))
    (tmp_path / "a-directory.pem").mkdir()
    lines = [
        f"            - {{cert: {tmp_path / 'missing.pem'}, key: {key}, server_names: [a.test]}}",
        f"            - {{cert: {cert}, key: {other_key}, server_names: [b.test]}}",
        f"            - {{cert: {old_cert}, key: {old_key}, server_names: [c.test]}}",
        f"            - {{cert: {tmp_path / 'a-directory.pem'}, key: {other_key}, server_names: [d.test]}}",
        f"            - {{cert: {other_cert}, key: {other_key}, server_names: [e.test, a.test]}}",
    ]
    findings = _findings(tmp_path, "\n".join(lines) + "\n")
    path = "proxies.edge.listeners[0].tls.certificates"
    assert findings[0].startswith(f"13:22: error: {path}[0].cert: cannot read certificate file ")
    assert findings[0].endswith("No such file or directory")
    assert findings[1].startswith(f"14:{_col(lines[1], str(other_key))}: error: {path}[1].key: ")
    assert "does not match the certificate" in findings[1] and "(line 14)" in findings[1]
    assert findings[2].startswith(f"15:22: error: {path}[2].cert: certificate 'CN=old.test'")
    assert "expired on" in findings[2]
    assert findings[3].startswith(f"16:22: error: {path}[3].cert: cannot read certificate file ")
    assert findings[3].endswith("Is a directory")
    assert findings[4] == (
        f"17:{_col(lines[4], '[e.test')}: error: {path}[4].server_names: server name 'a.test' is already served by"
        " certificates[0] (line 13); each name picks one certificate"
    )
    assert len(findings) == 5


def test_second_default_certificate_and_bad_key_file(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cert, key, _ = pki.issue("good.test", ["good.test"])
    lines = [f"            - {{cert: {cert}, key: {key}}}", f"            - {{cert: {cert}, key: {pki.ca}}}"]
    findings = _findings(tmp_path, "\n".join(lines) + "\n")
    path = "proxies.edge.listeners[0].tls.certificates"
    assert findings == [
        f"14:15: error: {path}[1].server_names: certificates[0] (line 13) is already the default certificate"
        " (no server_names); give this one server_names, or remove one of the two",
        f"14:{_col(lines[1], str(pki.ca))}: error: {path}[1].key: '{pki.ca}' holds no PEM private key",
    ]


# -- explain ------------------------------------------------------------------------------------------
def test_explain_knows_passthrough_and_termination(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cert, key, _ = pki.issue("edge.test", ["edge.test"])
    text = f"""apiVersion: keepsrc/v1
services:
  inner: {{endpoints: ["127.0.0.1:8443"]}}
  app: {{endpoints: ["127.0.0.1:9000"]}}
proxies:
  edge:
    listeners:
      - {{name: pass, address: 127.0.0.1:443, protocol: tcp, sni_routes: [{{server_names: [a.test], service: inner}}]}}
  inner:
    listeners:
      - {{name: https, address: 127.0.0.1:8443, protocol: http, routes: [{{prefix: /, service: app}}], xff: {{}},
         tls: {{certificates: [{{cert: {cert}, key: {key}}}]}}}}
"""
    (tmp_path / "t.yaml").write_text(text)
    out = render_text(explain(load_topology(tmp_path / "t.yaml")))
    assert "LOST: edge/pass: nothing carries the client address from edge/pass to 'inner'" in out
    assert "TLS passes through this hop encrypted, so X-Forwarded-For cannot carry it; only PROXY protocol" in out
    # The fix explain names: PROXY protocol over the passthrough hop; then XFF works again past the
    # hop that terminates TLS.
    fixed = text.replace('"127.0.0.1:8443"]}', '"127.0.0.1:8443"], send_proxy_protocol: v2}')
    fixed = fixed.replace("xff: {},", "xff: {}, accept_proxy_protocol: true,")
    (tmp_path / "t.yaml").write_text(fixed)
    out = render_text(explain(load_topology(tmp_path / "t.yaml")))
    assert out.startswith("edge/pass: kept\n"), out
    assert "inner/https: client address: PROXY protocol v2 header sent by edge/pass (service 'inner'); TLS" \
        " terminated here, so X-Forwarded-For is readable (and appended) again" in out
    assert "app 127.0.0.1:9000: X-Forwarded-For, appended by inner/https" in out
