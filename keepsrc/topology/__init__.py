"""Stage 1: topology YAML -> typed, immutable Topology."""

from keepsrc.topology.diagnostics import Diagnostic, Severity, TopologyError
from keepsrc.topology.loader import check_topology, check_topology_text, load_topology
from keepsrc.topology.model import (
    AcceptProxyProtocol,
    HealthCheck,
    LbPolicy,
    Listener,
    OriginalSrc,
    Placement,
    Protocol,
    Proxy,
    ProxyProtocolVersion,
    Route,
    Service,
    SocketAddress,
    Topology,
    Xff,
)

__all__ = [
    "AcceptProxyProtocol", "Diagnostic", "HealthCheck", "LbPolicy", "Listener", "OriginalSrc", "Placement",
    "Protocol", "Proxy", "ProxyProtocolVersion", "Route", "Service", "Severity", "SocketAddress", "Topology",
    "TopologyError", "Xff", "check_topology", "check_topology_text", "load_topology",
]
