"""Resources for Envoys that do not use ADS: their RDS and EDS come from per-type streams too.

The builder points every HTTP listener's RDS and every EDS cluster at `ads: {}`, which keeps
the make-before-break order on the one ADS stream. An Envoy bootstrapped with per-type LDS/CDS
(`keepsrc bootstrap --transport per-type`) has no ADS stream and NACKs those ("ADS must be
configured"); `self: {}` is no way out either, as Envoy 1.40 does not accept it for RDS or EDS.
So per-type streams serve a variant of each listener and cluster whose config sources name the
bootstrap's xDS cluster with the stream's own flavour, rewritten once per resource version.
"""

from __future__ import annotations

from functools import lru_cache

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3 import config_source_pb2, grpc_service_pb2
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
)

from keepsrc.snapshots.bootstrap import XDS_CLUSTER
from keepsrc.snapshots.snapshot import CLUSTER, LISTENER, Resource

REWRITTEN_TYPES = frozenset({LISTENER, CLUSTER})


def _api_source(delta: bool) -> config_source_pb2.ConfigSource:
    api = config_source_pb2.ApiConfigSource
    return config_source_pb2.ConfigSource(
        api_config_source=api(
            api_type=api.DELTA_GRPC if delta else api.GRPC,
            transport_api_version=config_source_pb2.V3,
            grpc_services=[grpc_service_pb2.GrpcService(envoy_grpc={"cluster_name": XDS_CLUSTER})],
            set_node_on_first_message_only=True,
        ),
        resource_api_version=config_source_pb2.V3,
    )


@lru_cache(maxsize=65536)
def per_type_variant(resource: Resource, delta: bool) -> Resource:
    """`resource` with its ADS config sources pointed at the per-type services (itself if none)."""
    source = _api_source(delta)
    if resource.type_url == CLUSTER:
        cluster = Cluster.FromString(resource.body)
        if not cluster.eds_cluster_config.eds_config.HasField("ads"):
            return resource
        cluster.eds_cluster_config.eds_config.CopyFrom(source)
        return Resource.of(resource.name, CLUSTER, cluster, resource.references)
    listener = Listener.FromString(resource.body)
    changed = False
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            if not network_filter.typed_config.Is(HttpConnectionManager.DESCRIPTOR):
                continue
            hcm = HttpConnectionManager.FromString(network_filter.typed_config.value)
            if hcm.HasField("rds") and hcm.rds.config_source.HasField("ads"):
                hcm.rds.config_source.CopyFrom(source)
                network_filter.typed_config.Pack(hcm, deterministic=True)
                changed = True
    return Resource.of(resource.name, LISTENER, listener, resource.references) if changed else resource
