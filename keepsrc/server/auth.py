"""Who may be served what: mutual TLS on the xDS port, and node authorization by SPIFFE ID.

An Envoy *claims* its node.id and node.cluster; its client certificate *proves* an identity. A
proxy entry is served only to the identity `spiffe://<trust domain>/keepsrc/<entry>`, or to one the
entry lists under `identities` (e.g. a fleet's shared identity), as istiod checks a connection's
identity against the proxy it asks to be. The identity is the one SPIFFE ID gRPC extracts from the
certificate (`peer_spiffe_id`): gRPC leaves it unset for a certificate with two SPIFFE URIs, and
such a certificate is refused, where a check of "any SAN matches" would accept it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger("keepsrc.server")

DEFAULT_TRUST_DOMAIN = "keepsrc.local"


def proxy_identity(trust_domain: str, entry: str) -> str:
    return f"spiffe://{trust_domain}/keepsrc/{entry}"


def admin_identity(trust_domain: str) -> str:
    """Who may read every node's status (CSDS, `keepsrc status`) on a TLS port."""
    return f"spiffe://{trust_domain}/keepsrc-admin"


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The client certificate's SPIFFE ID; None without TLS, without one, or with several."""
    values = (context.auth_context() or {}).get("peer_spiffe_id") or []
    if len(values) != 1:
        return None
    identity = values[0]
    return identity.decode(errors="replace") if isinstance(identity, bytes) else str(identity)


@dataclass(frozen=True)
class Authorizer:
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    admins: frozenset[str] = field(default_factory=frozenset)

    def may_have(self, identity: str | None, entry: str, extra: frozenset[str]) -> bool:
        return identity is not None and (identity == proxy_identity(self.trust_domain, entry) or identity in extra)

    def is_admin(self, identity: str | None) -> bool:
        return identity is not None and (identity == admin_identity(self.trust_domain) or identity in self.admins)


@dataclass(frozen=True)
class ServerTls:
    """PEM files of the server's certificate and key, and of the CA its clients' certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path

    def files(self) -> tuple[Path, Path, Path]:
        return self.cert, self.key, self.client_ca

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that read the files again when they change, checked at each new handshake:
        a renewed certificate is used for the next connection, and streams already open stay."""
        seen = [_stamp(self.files())]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            stamp = _stamp(self.files())
            if stamp == seen[0]:
                return None
            try:
                configuration = self._configuration()
            except (OSError, ValueError) as exc:
                log.error("TLS files changed but cannot be read (%s); keeping the certificate in use", exc)
                return None
            seen[0] = stamp
            log.info("TLS: %s changed; new connections get the renewed certificate", ", ".join(map(str, self.files())))
            return configuration

        return grpc.dynamic_ssl_server_credentials(self._configuration(), fetch,
                                                   require_client_authentication=True)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key.read_bytes(), self.cert.read_bytes())], root_certificates=self.client_ca.read_bytes())


def _stamp(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is rewritten or replaced (a renamed new file, a swapped symlink)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((0, 0, 0))
        else:
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)
