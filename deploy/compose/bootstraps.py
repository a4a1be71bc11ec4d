"""The Envoy bootstraps docker-compose.yml mounts: what `keepsrc bootstrap` prints for each, over mutual TLS.

A file is named <scenario>-<node>.yaml and its Envoy gets its config from the compose service
keepsrc-<scenario>, on port 18000, checking that keepsrc's certificate names keepsrc-<scenario> and
showing its own, proxies/<node>.pem, from the volume `pki` (mounted at /etc/keepsrc/pki) where the
one-shot service keepsrc-certs writes them with `keepsrc certs`.

`keepsrc bootstrap` also writes the file-based SDS secret the bootstrap points at, beside the
certificate; that path exists in the containers only, so here it is left out, and keepsrc-certs
writes it in the volume by running the same `keepsrc bootstrap --tls-...` there.

    deploy/compose/regenerate-bootstraps      # rewrite every bootstrap/*.yaml; review the diff
tests/test_compose.py fails while one differs from what this prints now.

The profile `replicas` is the exception to <inner|external>-<http|tcp>: replicas-<node>.yaml lists
both replicas, keepsrc-replica-a and keepsrc-replica-b (`--xds A --xds B`), which serve one
certificate naming keepsrc-replicas; that is the name the Envoy checks on either.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from keepsrc.cli import main

BOOTSTRAPS = Path(__file__).resolve().parent / "bootstrap"
PKI = "/etc/keepsrc/pki"  # the volume `pki`, in every keepsrc and Envoy container
XDS_PORT = 18000
ADMIN = "0.0.0.0:9901"  # the client container reads /clusters and /stats; no port is published
REPLICAS = "replicas"  # the profile whose Envoy lists several keepsrc servers
REPLICA_SERVERS = ("keepsrc-replica-a", "keepsrc-replica-b")


def split(path: Path) -> tuple[str, str]:
    """(scenario, node) of bootstrap/<scenario>-<node>.yaml; every scenario is <inner|external>-<http|tcp>,
    besides the profile `replicas`."""
    if path.stem.startswith(f"{REPLICAS}-"):
        return REPLICAS, path.stem.removeprefix(f"{REPLICAS}-")
    kind, protocol, node = path.stem.split("-", 2)
    return f"{kind}-{protocol}", node


def server_name(scenario: str) -> str:
    """The name keepsrc's certificate carries for the scenario (replicas: one name for both)."""
    return f"keepsrc-{scenario}"


def xds_servers(scenario: str) -> list[str]:
    """The compose services an Envoy of the scenario gets its config from."""
    return list(REPLICA_SERVERS) if scenario == REPLICAS else [server_name(scenario)]


def arguments(scenario: str, node: str) -> list[str]:
    xds = [arg for server in xds_servers(scenario) for arg in ("--xds", f"{server}:{XDS_PORT}")]
    return ["bootstrap", "--node", node, *xds, "--admin", ADMIN,
            "--tls-ca", f"{PKI}/ca.pem", "--tls-cert", f"{PKI}/proxies/{node}.pem",
            "--tls-key", f"{PKI}/proxies/{node}-key.pem", "--tls-server-name", server_name(scenario)]


def render(scenario: str, node: str) -> str:
    """What `keepsrc <arguments>` prints. Its note that the SDS file cannot be written here is
    dropped: keepsrc-certs writes it, in the volume, beside the certificate."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(arguments(scenario, node))
    if code != 0:
        raise SystemExit(f"keepsrc {' '.join(arguments(scenario, node))}: exit {code}")
    return out.getvalue()


def regenerate() -> list[Path]:
    files = sorted(BOOTSTRAPS.glob("*.yaml"))
    for path in files:
        path.write_text(render(*split(path)))
    return files


if __name__ == "__main__":
    for path in regenerate():
        print(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path, file=sys.stderr)
