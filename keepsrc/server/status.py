"""`keepsrc status`: ask running keepsrc servers (CSDS) what every connected Envoy holds; for
replicas of one store, also the store revision each serves."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.status.v3 import csds_pb2

from keepsrc.server.csds import REVISION_METADATA, SERVICE, UNLIMITED_RECEIVE
from keepsrc.snapshots.render import dump, to_dict
from keepsrc.snapshots.snapshot import SHORT_NAMES


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--xds", action="append", metavar="HOST:PORT",
                        help="a keepsrc server, HOST:PORT or unix:/path (default: 127.0.0.1:18000); replicas: "
                        "--xds A --xds B, or A,B")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    tls = parser.add_argument_group("a server with mutual TLS (serve --client-ca): an admin certificate")
    tls.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA the server's certificate must chain to")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM", help="admin certificate (keepsrc certs: admin.pem)")
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")
    tls.add_argument("--tls-server-name", metavar="NAME", help="the name the server's certificate must carry")


@dataclass(frozen=True)
class ReplicaStatus:
    target: str
    response: csds_pb2.ClientStatusResponse
    revision: int | None  # the store revision it serves; None: a file, or not a replica


def client_credentials(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())


def fetch_replica(target: str, timeout: float = 5.0, credentials: grpc.ChannelCredentials | None = None,
                  server_name: str | None = None) -> ReplicaStatus:
    options = [*UNLIMITED_RECEIVE, *([("grpc.ssl_target_name_override", server_name)] if server_name else [])]
    channel = (grpc.secure_channel(target, credentials, options) if credentials
               else grpc.insecure_channel(target, options))
    with channel:
        call = channel.unary_unary(
            f"/{SERVICE}/FetchClientStatus",
            request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
            response_deserializer=csds_pb2.ClientStatusResponse.FromString,
        )
        response, rpc = call.with_call(csds_pb2.ClientStatusRequest(), timeout=timeout)
        revision = dict(rpc.initial_metadata() or ()).get(REVISION_METADATA)
        return ReplicaStatus(target, response, int(revision) if revision is not None else None)


def fetch(target: str, timeout: float = 5.0) -> csds_pb2.ClientStatusResponse:
    return fetch_replica(target, timeout).response


def render_text(response: csds_pb2.ClientStatusResponse) -> str:
    if not response.config:
        return "no Envoy is connected\n"
    lines = []
    for config in response.config:
        lines.append(f"{config.node.id} (cluster {config.node.cluster or '-'})")
        for xds in config.generic_xds_configs:
            status = csds_pb2.ConfigStatus.Name(xds.config_status)
            client = config_dump_shared_pb2.ClientResourceStatus.Name(xds.client_status)
            line = f"  {SHORT_NAMES.get(xds.type_url, xds.type_url):9} {xds.version_info or '-':17} {status:8} {client}"
            if xds.HasField("error_state"):
                line += f": rejected {xds.error_state.version_info}: {xds.error_state.details}"
            lines.append(line)
    return "\n".join(lines) + "\n"


def _replica_heading(replica: ReplicaStatus) -> str:
    served = "a file (no store revision)" if replica.revision is None else f"store revision {replica.revision}"
    return f"== {replica.target}: {served}\n"


def run_status(args: argparse.Namespace) -> int:
    targets = [t.strip() for group in args.xds or ["127.0.0.1:18000"] for t in group.split(",") if t.strip()]
    replicas: list[ReplicaStatus] = []
    unreachable = False
    credentials = None
    if args.tls_cert is not None:
        if args.tls_ca is None or args.tls_key is None:
            print("keepsrc status: --tls-cert needs --tls-key and --tls-ca", file=sys.stderr)
            return 2
        credentials = client_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    for target in targets:
        try:
            replicas.append(fetch_replica(target, credentials=credentials, server_name=args.tls_server_name))
        except grpc.RpcError as exc:
            print(f"keepsrc status: cannot reach a keepsrc server at {target}: {exc.details()}", file=sys.stderr)
            unreachable = True
    if len(targets) == 1 and replicas:
        # One server: as it always was, plus the revision when it serves a shared store.
        replica = replicas[0]
        if args.format == "json":
            sys.stdout.write(dump(to_dict(replica.response), "json"))
        else:
            sys.stdout.write((_replica_heading(replica) if replica.revision is not None else "")
                             + render_text(replica.response))
    elif args.format == "json":
        data: Any = [{"xds": r.target, "revision": r.revision, **to_dict(r.response)} for r in replicas]
        sys.stdout.write(dump(data, "json"))
    else:
        sys.stdout.write("".join(_replica_heading(r) + render_text(r.response) for r in replicas))
        revisions = {r.revision for r in replicas}
        if len(revisions) > 1:
            print("replicas serve different store revisions: "
                  + ", ".join(f"{r.target} {r.revision}" for r in replicas), file=sys.stderr)
    if unreachable:
        return 2
    errors = any(x.config_status == csds_pb2.ERROR
                 for r in replicas for c in r.response.config for x in c.generic_xds_configs)
    return 1 if errors else 0
