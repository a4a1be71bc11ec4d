"""Stage 3: the xDS server (ADS and per-type, SotW and delta) that serves snapshots to Envoys."""

from keepsrc.server.cache import Nack, NodeStatus, SnapshotCache, TypeStatus
from keepsrc.server.reload import TopologySource
from keepsrc.server.service import XdsServer, serve, start

__all__ = [
    "Nack", "NodeStatus", "SnapshotCache", "TopologySource", "TypeStatus", "XdsServer", "serve", "start",
]
