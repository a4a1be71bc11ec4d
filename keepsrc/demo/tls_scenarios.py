"""What scenarios 8-10 of `keepsrc demo` (TLS at the edge) need besides the demo's hosts: a demo CA,
a TLS client run on the client host, and nginx with `listen ... ssl proxy_protocol`.

The CA and its certificates are made at run time in the demo's work directory, valid for an hour,
and go with it; nothing is checked in. `keepsrc serve` writes its SDS files beside them, as it does
beside real certificates.
"""

from __future__ import annotations

import datetime
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keepsrc.demo.hosts import Host
from keepsrc.demo.nginx import nginx_conf

LIFETIME = datetime.timedelta(hours=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class DemoPki:
    """A short-lived CA in `directory` (ca.pem), and server certificates it signs."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder().subject_name(_name("keepsrc demo CA")).issuer_name(_name("keepsrc demo CA"))
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, dns_name: str) -> tuple[Path, Path]:
        """(certificate, key) files for `dns_name`: its subject CN and its one SAN."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(_name(dns_name)).issuer_name(self._cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + LIFETIME)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        cert_path, key_path = self.directory / f"{dns_name}.pem", self.directory / f"{dns_name}.key"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path


# Run inside the client host: one TLS exchange, verified against the demo CA for the SNI name (as a
# browser checks a site), printing the certificate served and the reply as JSON.
TLS_CLIENT = r"""
import json, socket, ssl, sys
from keepsrc.demo.backends import proxy_v2_header
host, port, sni, ca, header_for, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], \
    sys.argv[6].encode()
out = {"subject": "", "sans": [], "reply": "", "error": ""}
context = ssl.create_default_context(cafile=ca)  # the demo CA only, and the name must match
try:
    with socket.create_connection((host, port), timeout=8) as raw:
        if header_for:  # play the load balancer: a PROXY v2 header naming this client, before the ClientHello
            raw.sendall(proxy_v2_header(header_for, host, 40000, port))
        with context.wrap_socket(raw, server_hostname=sni) as tls:
            cert = tls.getpeercert()
            out["subject"] = "CN=" + dict(rdn[0] for rdn in cert["subject"]).get("commonName", "")
            out["sans"] = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
            tls.sendall(payload)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            out["reply"] = data.decode(errors="replace")
except ssl.SSLCertVerificationError as exc:
    out["error"] = f"certificate refused: {exc.verify_message}"
except OSError:
    out["error"] = "refused"
print(json.dumps(out))
"""


@dataclass
class TlsReply:
    subject: str  # of the certificate the client was served and verified, e.g. "CN=www.demo.test"
    sans: list[str]
    reply: str  # what came back over TLS, CRLF normalised
    error: str  # "refused", "certificate refused: ...", or ""

    @property
    def certificate(self) -> str:
        """What a row shows: the subject of a verified certificate whose one SAN is its CN, else what is off."""
        if self.error and not self.subject:
            return self.error
        return self.subject if [f"CN={n}" for n in self.sans] == [self.subject] else f"{self.subject} {self.sans}"


def tls_exchange(client: Host, address: str, sni: str, ca: Path, payload: str = "",
                 proxy_header_for: str = "") -> TlsReply:
    """One TLS connection from `client` to `address` (already translated), sending `payload`."""
    ip, _, port = address.rpartition(":")
    result = client.run(sys.executable, "-c", TLS_CLIENT, ip.strip("[]"), port, sni, str(ca), proxy_header_for,
                        payload, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"TLS client failed: {result.stderr.strip().splitlines()[-1:]}")
    out = json.loads(result.stdout)
    return TlsReply(out["subject"], out["sans"], out["reply"].replace("\r\n", "\n"), out["error"])


# nginx as a TLS upstream that requires a PROXY header before the handshake; it answers and logs
# $proxy_protocol_addr (the header's client) beside $remote_addr (its TCP peer: the Envoy).
NGINX_TLS_CONF = nginx_conf("""\
    log_format pp '$proxy_protocol_addr $remote_addr $ssl_protocol "$request"';
    server {{
        listen {listen} ssl proxy_protocol;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        access_log {dir}/nginx-pp.log pp;
        location / {{ return 200 "$proxy_protocol_addr $remote_addr $ssl_protocol\\n"; }}
    }}
""")
