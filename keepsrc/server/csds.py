"""CSDS (envoy.service.status.v3): what each connected Envoy holds, ACKed or NACKed, per type.

The standard xDS way to ask a control plane for client state, so `keepsrc status` and any CSDS
tool (e.g. istioctl-style dashboards) read the same thing.
"""

from __future__ import annotations

import grpc
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import timestamp_pb2

from keepsrc.server import metrics
from keepsrc.server.auth import Authorizer, admin_identity, peer_identity
from keepsrc.server.cache import SnapshotCache
from keepsrc.snapshots.snapshot import TYPE_ORDER

SERVICE = "envoy.service.status.v3.ClientStatusDiscoveryService"
REVISION_METADATA = "keepsrc-revision"


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


def handler(cache: SnapshotCache, authorizer: Authorizer | None = None) -> grpc.GenericRpcHandler:
    """CSDS lists every node and its NACK texts: with an `authorizer` (TLS), for admins only."""
    async def fetch(_request: csds_pb2.ClientStatusRequest,
                    context: grpc.aio.ServicerContext) -> csds_pb2.ClientStatusResponse:
        if authorizer is not None and not authorizer.is_admin(identity := peer_identity(context)):
            metrics.XDS_DENIED.inc()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the status of every node is for {admin_identity(authorizer.trust_domain)} only; "
                                f"this certificate is {identity or '(no single SPIFFE ID)'}")
        if cache.revision is not None:
            # Which store revision this replica serves: CSDS has no field for the server's side.
            await context.send_initial_metadata(((REVISION_METADATA, str(cache.revision)),))
        return client_status(cache)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "FetchClientStatus": grpc.unary_unary_rpc_method_handler(
            fetch,
            request_deserializer=csds_pb2.ClientStatusRequest.FromString,
            response_serializer=csds_pb2.ClientStatusResponse.SerializeToString,
        ),
    })
