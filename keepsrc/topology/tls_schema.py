"""Schema v1's TLS settings: a listener's certificates (`tls`) and a service's upstream TLS.

Mixed into the schema (loader.py). Beyond the shape of the settings, the files themselves are
checked as Envoy will need them: they exist, parse, match each other and are in date.
"""

from __future__ import annotations

import datetime
import os
import re
import warnings

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning
from yaml.nodes import Node

from keepsrc.topology.checker import DNS_LABEL, Checker, Keys, Parsers, file_path_problem, quoted
from keepsrc.topology.model import Certificate, DownstreamTls, TlsVersion, UpstreamTls

# An SNI name: a hostname, or a wildcard for one level of subdomains (Envoy's server_names).
SERVER_NAME_RE = re.compile(rf"(\*\.)?{DNS_LABEL}(\.{DNS_LABEL})*")
ALPN = ["h2", "http/1.1"]
TLS_VERSIONS = [v.value for v in TlsVersion]


class TlsSchema(Checker):
    """The TLS sections of schema v1."""

    def downstream_tls(self, node: Node, path: str) -> DownstreamTls | None:
        required = {"certificates": "a list of {cert, key, server_names}"}
        keys = self.mapping(node, path, ["certificates", "alpn", "min_version"], required)
        if keys is None:
            return None
        parsers: Parsers = {
            "certificates": ("certificates", self.certificates),
            "alpn": ("alpn", self.alpn),
            "min_version": ("min_version", self.tls_version),
        }
        values = self.fields(keys, path, parsers)
        return None if None in values.values() or "certificates" not in keys else DownstreamTls(**values)

    def certificates(self, node: Node, path: str) -> tuple[Certificate, ...] | None:
        items = self.non_empty_sequence(
            node, path, "a list of {cert, key, server_names}",
            "list at least one certificate: {cert: /path/chain.pem, key: /path/key.pem}",
        )
        if items is None:
            return None
        certificates = [self.certificate(item, f"{path}[{i}]", server_names=True) for i, item in enumerate(items)]
        if None in certificates:
            return None
        # Envoy picks a filter chain by SNI: one name in two chains, or two chains for clients
        # without a known name, is a listener Envoy refuses.
        claimed: dict[str, int] = {}  # name -> index of the certificate serving it ('' for the default)
        for i, certificate in enumerate(certificates):
            assert certificate is not None
            for name in certificate.server_names or ("",):
                if name in claimed:
                    first = claimed[name]
                    by = f"{path.rpartition('.')[2]}[{first}] (line {self.line(self.names_or_item(items[first]))})"
                    problem = (f"server name {quoted(name)} is already served by {by}; each name picks one"
                               " certificate" if name else
                               f"{by} is already the default certificate (no server_names); give this"
                               " one server_names, or remove one of the two")
                    self.report(self.names_or_item(items[i]), f"{path}[{i}].server_names", problem)
                    return None
                claimed[name] = i
        return tuple(c for c in certificates if c is not None)

    def names_or_item(self, item: Node) -> Node:
        """Where a certificate's server names are written: its server_names, or the certificate itself."""
        return self.value_at(item, "server_names") or item

    def certificate(self, node: Node, path: str, server_names: bool) -> Certificate | None:
        allowed = ["cert", "key", "server_names"] if server_names else ["cert", "key"]
        required = {"cert": "the PEM certificate chain file", "key": "the PEM private key file"}
        keys = self.mapping(node, path, allowed, required)
        if keys is None or "cert" not in keys or "key" not in keys:
            return None
        parsers: Parsers = {
            "cert": ("cert", self.pem_path),
            "key": ("key", self.pem_path),
            "server_names": ("server_names", self.server_names),
        }
        values = self.fields(keys, path, parsers)
        if None in values.values():
            return None
        certificate = Certificate(**values)
        self.check_key_pair(certificate, keys, path)
        return certificate

    def pem_path(self, node: Node, path: str) -> str | None:
        target = self.scalar(node, path, str, "an absolute path of a PEM file")
        if target is None:
            return None
        if not target.startswith("/"):
            self.report(
                node, path,
                f"{quoted(target)} is relative, and Envoy would resolve it against its own working directory;"
                " valid: an absolute path such as /etc/keepsrc/tls/edge.pem",
            )
            return None
        problem = file_path_problem(target)
        if problem:
            self.report(node, path, f"{quoted(target)} {problem}; valid: e.g. /etc/keepsrc/tls/edge.pem")
            return None
        return target

    def check_key_pair(self, certificate: Certificate, keys: Keys, path: str) -> None:
        """The files exist, parse, match and are in date, as Envoy will need them to.

        Envoy runs on this host or sees the same files (keepsrc writes the SDS file beside the
        certificate); a problem found here would otherwise be a listener that resets every handshake.
        """
        cert_node, key_node = keys["cert"][1], keys["key"][1]
        chain = self.read_certificates(cert_node, f"{path}.cert", certificate.cert)
        key_data = self.read_file(key_node, f"{path}.key", certificate.key, "private key")
        if key_data is None:
            return
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except TypeError:
            self.report(key_node, f"{path}.key", f"{quoted(certificate.key)} is an encrypted private key; Envoy"
                        " needs it unencrypted (openssl pkey -in KEY -out KEY.plain)")
            return
        except (ValueError, UnsupportedAlgorithm):
            self.report(key_node, f"{path}.key", f"{quoted(certificate.key)} holds no PEM private key")
            return
        if chain and _public(chain[0].public_key()) != _public(key.public_key()):
            self.report(
                key_node, f"{path}.key",
                f"{quoted(certificate.key)} does not match the certificate in {quoted(certificate.cert)} (line"
                f" {self.line(cert_node)}): its public key differs; use the key it was issued for",
            )
        if not os.access(os.path.dirname(certificate.cert), os.W_OK):
            self.report(
                cert_node, f"{path}.cert",
                f"keepsrc writes the SDS file Envoy reads this certificate through beside it, and"
                f" {quoted(os.path.dirname(certificate.cert))} is not writable here",
            )

    def read_file(self, node: Node, path: str, file: str, what: str) -> bytes | None:
        try:
            with open(file, "rb") as f:
                return f.read(1 << 20)  # a PEM bundle of every public root CA is about 200 KB
        except OSError as exc:
            self.report(node, path, f"cannot read {what} file {quoted(file)}: {exc.strerror or exc}")
            return None

    def read_certificates(
        self, node: Node, path: str, file: str, bundle: bool = False
    ) -> list[x509.Certificate] | None:
        """The PEM certificates in `file`, leaf first; reported when none, or when one is out of date
        (a CA `bundle`: when all are, since a system bundle may still list a retired root)."""
        data = self.read_file(node, path, file, "certificate")
        if data is None:
            return None
        try:
            with warnings.catch_warnings():
                # Debian's bundle has a root with a negative serial number, which cryptography
                # warns about; BoringSSL in Envoy reads it, and it is not the user's to fix.
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                chain = x509.load_pem_x509_certificates(data)
        except ValueError:
            self.report(node, path, f"{quoted(file)} holds no PEM certificate ('-----BEGIN CERTIFICATE-----')")
            return None
        now = datetime.datetime.now(datetime.UTC)
        expired = [cert for cert in chain if cert.not_valid_after_utc < now]
        if expired and (not bundle or len(expired) == len(chain)):
            cert = expired[0]
            subject = cert.subject.rfc4514_string() or "(no subject)"
            self.report(
                node, path,
                f"certificate {quoted(subject)} in {quoted(file)} expired on"
                f" {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; every client would refuse it: renew it",
            )
            return None
        return chain

    def server_names(self, node: Node, path: str) -> tuple[str, ...] | None:
        items = self.non_empty_sequence(
            node, path, "a list of SNI names, e.g. [shop.example.com, '*.example.com']",
            "list at least one name, or remove server_names (the default certificate)",
        )
        if items is None:
            return None
        names: dict[str, None] = {}
        for i, item in enumerate(items):
            name = self.server_name(item, f"{path}[{i}]")
            if name is None:
                return None
            if name in names:
                self.report(item, f"{path}[{i}]", f"duplicate server name {quoted(name)}; list each name once")
                return None
            names[name] = None
        return tuple(names)

    def server_name(self, node: Node, path: str) -> str | None:
        name = self.scalar(node, path, str, "an SNI name such as shop.example.com or *.example.com")
        if name is None:
            return None
        if len(name) > 253 or not SERVER_NAME_RE.fullmatch(name) or name != name.lower():
            self.report(
                node, path,
                f"{quoted(name)} is not an SNI name; valid: a lowercase hostname (shop.example.com) or a wildcard"
                " for one level of subdomains (*.example.com)",
            )
            return None
        return name

    def alpn(self, node: Node, path: str) -> tuple[str, ...] | None:
        items = self.non_empty_sequence(
            node, path, f"a list of ALPN protocols ({', '.join(ALPN)})",
            f"list at least one of {', '.join(ALPN)}, or remove alpn (both)",
        )
        if items is None:
            return None
        protocols = [self.choice(item, f"{path}[{i}]", str, ALPN) for i, item in enumerate(items)]
        return None if None in protocols else tuple(dict.fromkeys(p for p in protocols if p is not None))

    def tls_version(self, node: Node, path: str) -> TlsVersion | None:
        # `1.2` unquoted is a number to YAML; it can only mean the version.
        return self.choice_as_written(node, path, TlsVersion, TLS_VERSIONS)

    def upstream_tls(self, node: Node, path: str) -> UpstreamTls | None:
        allowed = ["ca", "sni", "client_certificate", "min_version"]
        required = {"ca": "the PEM CA bundle to verify the upstream's certificate with"}
        keys = self.mapping(node, path, allowed, required)
        if keys is None or "ca" not in keys:
            return None
        parsers: Parsers = {
            "ca": ("ca", self.ca),
            "sni": ("sni", self.sni),
            "client_certificate": ("client_certificate", lambda n, p: self.certificate(n, p, server_names=False)),
            "min_version": ("min_version", self.tls_version),
        }
        values = self.fields(keys, path, parsers)
        return None if None in values.values() else UpstreamTls(**values)

    def ca(self, node: Node, path: str) -> str | None:
        target = self.pem_path(node, path)
        if target is None or self.read_certificates(node, path, target, bundle=True) is None:
            return None
        return target

    def sni(self, node: Node, path: str) -> str | None:
        name = self.server_name(node, path)
        if name is not None and name.startswith("*."):
            self.report(node, path, f"{quoted(name)}: a client names one server; valid: e.g. backend.example.com")
            return None
        return name


def _public(key: object) -> bytes:
    """A public key's SubjectPublicKeyInfo bytes: equal exactly when two keys are one key."""
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
