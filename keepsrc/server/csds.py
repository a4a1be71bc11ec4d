"""CSDS (envoy.service.status.v3): what each connected Envoy holds, ACKed or NACKed, per type.

The standard xDS way to ask a control plane for client state, so `keepsrc status` and any CSDS
tool (e.g. istioctl-style dashboards) read the same thing.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import timestamp_pb2

from keepsrc.server import metrics
from keepsrc.server.auth import Authorizer, admin_identity, peer_identity
from keepsrc.server.cache import SnapshotCache
from keepsrc.snapshots.snapshot import TYPE_ORDER

log = logging.getLogger("keepsrc.server")

SERVICE = "envoy.service.status.v3.ClientStatusDiscoveryService"
REVISION_METADATA = "keepsrc-revision"
# Every node of a large fleet is ~350 bytes of status: 10,000 are more than gRPC's default 4 MiB.
UNLIMITED_RECEIVE = [("grpc.max_receive_message_length", -1)]
PEER_TIMEOUT_S = 5.0


def client_status(cache: SnapshotCache) -> csds_pb2.ClientStatusResponse:
    """One ClientConfig per connected node: per type the ACKed version, whether it is the last
    version sent with nothing newer waiting (SYNCED) or a newer one is in flight or waiting
    (STALE), and a NACK whose rejected content the snapshot still holds (ERROR)."""
    response = csds_pb2.ClientStatusResponse()
    for node_id, status in sorted(cache.status.items()):
        config = response.config.add(node=base_pb2.Node(id=node_id, cluster=status.cluster))
        for type_url in TYPE_ORDER:
            if type_url not in status.types:
                continue
            state = status.types[type_url]
            xds = config.generic_xds_configs.add(type_url=type_url, version_info=state.acked)
            if state.nack is not None:
                xds.config_status = csds_pb2.ERROR
                xds.client_status = config_dump_shared_pb2.NACKED
                xds.error_state.details = state.nack.message
                xds.error_state.version_info = state.nack.version
                xds.error_state.last_update_attempt.CopyFrom(timestamp_pb2.Timestamp(seconds=int(state.nack.at)))
            elif state.acked and state.acked == state.sent and not state.waiting:
                xds.config_status = csds_pb2.SYNCED
                xds.client_status = config_dump_shared_pb2.ACKED
            else:
                xds.config_status = csds_pb2.STALE if state.sent or state.waiting else csds_pb2.NOT_SENT
                xds.client_status = config_dump_shared_pb2.ACKED if state.acked else config_dump_shared_pb2.REQUESTED
    return response


async def _with_peers(cache: SnapshotCache, peers: tuple[str, ...],
                      channels: dict[str, grpc.aio.Channel]) -> tuple[csds_pb2.ClientStatusResponse, int | None]:
    """This worker's nodes and every other worker's (asked on its private socket), by node id,
    and the oldest store revision any of them serves. A worker that does not answer (being
    started again) is left out, with a warning: its Envoys are reconnecting anyway."""
    async def ask(peer: str) -> tuple[csds_pb2.ClientStatusResponse, int | None]:
        channel = channels.get(peer)
        if channel is None:
            channel = channels[peer] = grpc.aio.insecure_channel(peer, options=UNLIMITED_RECEIVE)
        call = channel.unary_unary(f"/{SERVICE}/FetchClientStatus",
                                   request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
                                   response_deserializer=csds_pb2.ClientStatusResponse.FromString)(
            csds_pb2.ClientStatusRequest(), timeout=PEER_TIMEOUT_S)
        revision = dict(await call.initial_metadata() or ()).get(REVISION_METADATA)
        return await call, None if revision is None else int(revision)

    answers = await asyncio.gather(*(ask(peer) for peer in peers), return_exceptions=True)
    configs = {config.node.id: config for config in client_status(cache).config}
    revisions = [] if cache.revision is None else [cache.revision]
    for peer, answer in zip(peers, answers, strict=True):
        if isinstance(answer, BaseException):
            log.warning("CSDS: worker at %s did not answer (%s); its nodes are left out", peer, answer)
            continue
        response, revision = answer
        for config in response.config:
            configs.setdefault(config.node.id, config)  # a node moving between workers: this one's view
        if revision is not None:
            revisions.append(revision)
    return (csds_pb2.ClientStatusResponse(config=[configs[n] for n in sorted(configs)]),
            min(revisions) if revisions else None)


async def serve_private(cache: SnapshotCache, address: str) -> grpc.aio.Server:
    """CSDS of this worker's nodes only, for the other workers (`address`: a unix socket in the
    supervisor's run directory, which only its user can reach)."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([handler(cache)])
    server.add_insecure_port(address)
    await server.start()
    return server


def handler(cache: SnapshotCache, authorizer: Authorizer | None = None,
            peers: tuple[str, ...] = ()) -> grpc.GenericRpcHandler:
    """CSDS lists every node and its NACK texts: with an `authorizer` (TLS), for admins only.
    `peers`: the other workers' private sockets, whose nodes are listed too."""
    channels: dict[str, grpc.aio.Channel] = {}

    async def fetch(_request: csds_pb2.ClientStatusRequest,
                    context: grpc.aio.ServicerContext) -> csds_pb2.ClientStatusResponse:
        if authorizer is not None and not authorizer.is_admin(identity := peer_identity(context)):
            metrics.XDS_DENIED.inc()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the status of every node is for {admin_identity(authorizer.trust_domain)} only; "
                                f"this certificate is {identity or '(no single SPIFFE ID)'}")
        response, revision = (client_status(cache), cache.revision) if not peers else \
            await _with_peers(cache, peers, channels)
        if revision is not None:
            # Which store revision this replica serves: CSDS has no field for the server's side.
            await context.send_initial_metadata(((REVISION_METADATA, str(revision)),))
        return response

    return grpc.method_handlers_generic_handler(SERVICE, {
        "FetchClientStatus": grpc.unary_unary_rpc_method_handler(
            fetch,
            request_deserializer=csds_pb2.ClientStatusRequest.FromString,
            response_serializer=csds_pb2.ClientStatusResponse.SerializeToString,
        ),
    })
