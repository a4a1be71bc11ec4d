"""`keepsrc certs`: a development CA and the certificates mutual TLS between keepsrc and its Envoys needs.

- `ca.pem` / `ca-key.pem`: the CA (kept when present, so running again renews the others under it);
- `server.pem` / `server-key.pem`: keepsrc's own, for `serve --tls-cert/--tls-key`, valid for the
  given names and addresses (localhost, 127.0.0.1 and ::1 by default);
- `proxies/<proxy>.pem` / `proxies/<proxy>-key.pem` per proxy entry: an Envoy's client certificate
  whose one SPIFFE ID, spiffe://<trust domain>/keepsrc/<proxy>, is what the server authorizes it by;
- `admin.pem` / `admin-key.pem`: spiffe://<trust domain>/keepsrc-admin, for `keepsrc status`.

Files are replaced atomically (Envoy and keepsrc watch them: a renewal is picked up, not half-read);
private keys are 0600. For production, issue the same SPIFFE IDs from your own CA (SPIRE, cert-manager).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keepsrc.server.auth import DEFAULT_TRUST_DOMAIN, admin_identity, proxy_identity

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
Key = ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keepsrc development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    # Five minutes back: a peer whose clock is a little behind must not see "not yet valid".
    return builder.not_valid_before(_now() - datetime.timedelta(minutes=5)).not_valid_after(
        _now() + datetime.timedelta(days=days))


def make_ca(trust_domain: str, days: int) -> tuple[x509.Certificate, Key]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"keepsrc development CA for {trust_domain}")
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False)
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
    cert = (
        _validity(builder.serial_number(x509.random_serial_number()), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(ca: x509.Certificate, ca_key: Key, common_name: str, *, names: Iterable[str] = (),
          uris: Iterable[str] = (), server: bool = False, days: int = 30) -> tuple[x509.Certificate, Key]:
    """A leaf certificate: DNS names and IP addresses in `names`, SPIFFE IDs in `uris`."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    sans += [x509.UniformResourceIdentifier(uri) for uri in uris]
    usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        _validity(x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca.subject)
                  .public_key(key.public_key()).serial_number(x509.random_serial_number()), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_pair(directory: Path, stem: str, cert: x509.Certificate, key: Key) -> None:
    # The key first: a reader that sees the new certificate finds its key already in place.
    _write(directory / f"{stem}-key.pem", _key_pem(key), 0o600)
    _write(directory / f"{stem}.pem", _pem(cert), 0o644)


def write_pki(directory: Path, proxies: Iterable[str], trust_domain: str = DEFAULT_TRUST_DOMAIN,
              server_names: Iterable[str] = DEFAULT_SERVER_NAMES, days: int = 30) -> list[Path]:
    """Write (or renew) the files listed in the module docstring; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, ca_key_path = directory / "ca.pem", directory / "ca-key.pem"
    if ca_path.exists() and ca_key_path.exists():
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_path} is not the EC key keepsrc certs makes")
    else:
        ca, ca_key = make_ca(trust_domain, days=max(days, 365))
        write_pair(directory, "ca", ca, ca_key)
    written = [ca_path]
    cert, key = issue(ca, ca_key, "keepsrc", names=server_names, server=True, days=days)
    write_pair(directory, "server", cert, key)
    written.append(directory / "server.pem")
    (directory / "proxies").mkdir(exist_ok=True)
    for proxy in dict.fromkeys(proxies):
        cert, key = issue(ca, ca_key, proxy, uris=[proxy_identity(trust_domain, proxy)], days=days)
        write_pair(directory / "proxies", proxy, cert, key)
        written.append(directory / "proxies" / f"{proxy}.pem")
    cert, key = issue(ca, ca_key, "keepsrc-admin", uris=[admin_identity(trust_domain)], days=days)
    write_pair(directory, "admin", cert, key)
    written.append(directory / "admin.pem")
    return written
