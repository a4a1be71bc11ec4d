"""TLS pieces of Envoy config: termination contexts, upstream contexts, and the SDS files behind them.

Certificates reach Envoy through file-based SDS, not inline: a listener whose TlsCertificate is
inline keeps the certificate it was built with until the listener itself is replaced (a drain).
An `SdsSecretConfig` with a `path_config_source` makes Envoy read a small secret file once and then
watch the certificate's directory itself: a renewed certificate moved into place is used for the
next handshake, with no xDS push, no listener change and no drain (`ssl_context_update_by_sds`
counts each reload). The secret file is the one thing keepsrc writes to disk: beside the
certificate, where the Envoy that reads the certificate can read it too. Builders only name it;
`write_secret_files` writes it, at the edges (`serve` on each load, `render --static`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, json_format

from keepsrc.topology.model import Certificate, DownstreamTls, TlsVersion, Topology, UpstreamTls

TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
TLS_VERSIONS = {
    TlsVersion.TLS1_2: common_pb2.TlsParameters.TLSv1_2,
    TlsVersion.TLS1_3: common_pb2.TlsParameters.TLSv1_3,
}


def secret_name(certificate: Certificate) -> str:
    """Stable per (cert, key) pair, readable in Envoy's `sds.<name>.*` stats."""
    digest = hashlib.sha256(f"{certificate.cert}\0{certificate.key}".encode()).hexdigest()[:8]
    return f"{os.path.basename(certificate.cert)}-{digest}"


def secret_path(certificate: Certificate) -> str:
    return f"{certificate.cert}.keepsrc-sds.json"


def secret_file(certificate: Certificate) -> str:
    """The SDS secret file's text: one TlsCertificate naming the PEM files.

    With both files in one directory, that directory is Envoy's `watched_directory`: Envoy re-reads
    the pair on every rename into it and keeps the old pair when the new one does not match yet, so
    a renewal that moves the key and the certificate one after the other never serves a broken pair.
    """
    tls_certificate = common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(filename=certificate.cert),
        private_key=base_pb2.DataSource(filename=certificate.key),
    )
    directory = os.path.dirname(certificate.cert)
    if os.path.dirname(certificate.key) == directory:
        tls_certificate.watched_directory.path = directory
    secret = secret_pb2.Secret(name=secret_name(certificate), tls_certificate=tls_certificate)
    packed = any_pb2.Any()
    packed.Pack(secret, deterministic=True)
    response = discovery_pb2.DiscoveryResponse(resources=[packed])
    data = json_format.MessageToDict(response, preserving_proto_field_name=True)
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def secret_files(topology: Topology) -> dict[str, str]:
    """Path -> text of every SDS secret file the topology's resources point at."""
    certificates = [c for proxy in topology.proxies.values() for listener in proxy.listeners
                    if listener.tls is not None for c in listener.tls.certificates]
    certificates += [s.tls.client_certificate for s in topology.services.values()
                     if s.tls is not None and s.tls.client_certificate is not None]
    return {secret_path(c): secret_file(c) for c in certificates}


def write_secret_files(topology: Topology) -> list[str]:
    """Write the SDS files `topology` needs, each unless it already holds the same text; their paths.

    I/O at the edge: `keepsrc serve` calls it on every load and `render --static` before printing,
    so the builders stay pure. Atomic (a rename in the same directory), so Envoy never reads half
    a file, and a reload that keeps a certificate does not touch its file.
    """
    files = secret_files(topology)
    for name, text in files.items():
        _write_if_changed(Path(name), text)
    return sorted(files)


def write_secret_file(certificate: Certificate) -> str:
    """`write_secret_files` for one certificate (an Envoy's own, in its bootstrap); its path."""
    path = secret_path(certificate)
    _write_if_changed(Path(path), secret_file(certificate))
    return path


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except OSError:
        pass  # absent, or unreadable: write it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def sds_certificate(certificate: Certificate) -> secret_pb2.SdsSecretConfig:
    """Points Envoy at the certificate's SDS file (written by `write_secret_files`)."""
    source = config_source_pb2.ConfigSource(
        path_config_source=config_source_pb2.PathConfigSource(path=secret_path(certificate)),
        resource_api_version=config_source_pb2.V3,
    )
    return secret_pb2.SdsSecretConfig(name=secret_name(certificate), sds_config=source)


def downstream_context(tls: DownstreamTls, certificate: Certificate) -> tls_pb2.DownstreamTlsContext:
    """The TLS context of the filter chain that serves `certificate`."""
    common = tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(tls_minimum_protocol_version=TLS_VERSIONS[tls.min_version]),
        alpn_protocols=list(tls.alpn),
        tls_certificate_sds_secret_configs=[sds_certificate(certificate)],
    )
    return tls_pb2.DownstreamTlsContext(common_tls_context=common)


def upstream_context(tls: UpstreamTls) -> tls_pb2.UpstreamTlsContext:
    """Verifies the upstream's certificate against `ca`, and its name against `sni` when given."""
    validation = common_pb2.CertificateValidationContext(trusted_ca=base_pb2.DataSource(filename=tls.ca))
    if tls.sni is not None:
        validation.match_typed_subject_alt_names.append(common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.DNS, matcher=string_pb2.StringMatcher(exact=tls.sni)
        ))
    common = tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(tls_minimum_protocol_version=TLS_VERSIONS[tls.min_version]),
        validation_context=validation,
    )
    if tls.client_certificate is not None:
        common.tls_certificate_sds_secret_configs.append(sds_certificate(tls.client_certificate))
    return tls_pb2.UpstreamTlsContext(common_tls_context=common, sni=tls.sni or "")
