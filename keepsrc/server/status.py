"""`keepsrc status`: ask a running keepsrc server (CSDS) what every connected Envoy holds."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.status.v3 import csds_pb2

from keepsrc.server.csds import SERVICE
from keepsrc.snapshots.render import dump, to_dict
from keepsrc.snapshots.snapshot import SHORT_NAMES


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--xds", default="127.0.0.1:18000", metavar="HOST:PORT",
                        help="the keepsrc server, HOST:PORT or unix:/path (default: %(default)s)")
    parser.add_argument("--format", choices=["text", "json"], default="text")


def fetch(target: str, timeout: float = 5.0) -> csds_pb2.ClientStatusResponse:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/FetchClientStatus",
            request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
            response_deserializer=csds_pb2.ClientStatusResponse.FromString,
        )
        response: csds_pb2.ClientStatusResponse = call(csds_pb2.ClientStatusRequest(), timeout=timeout)
        return response


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


def run_status(args: argparse.Namespace) -> int:
    try:
        response = fetch(args.xds)
    except grpc.RpcError as exc:
        print(f"keepsrc status: cannot reach a keepsrc server at {args.xds}: {exc.details()}", file=sys.stderr)
        return 2
    data: Any = to_dict(response)
    sys.stdout.write(dump(data, "json") if args.format == "json" else render_text(response))
    errors = any(x.config_status == csds_pb2.ERROR for c in response.config for x in c.generic_xds_configs)
    return 1 if errors else 0
