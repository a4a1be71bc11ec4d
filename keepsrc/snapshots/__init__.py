"""Stage 2: Topology -> per-node Snapshot of typed Envoy resources."""

from keepsrc.snapshots.builder import build_snapshot, build_snapshots
from keepsrc.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_ORDER, Resource, Snapshot

__all__ = [
    "CLUSTER", "ENDPOINT", "LISTENER", "ROUTE", "TYPE_ORDER", "Resource", "Snapshot", "build_snapshot",
    "build_snapshots",
]
