"""Typed resources -> plain data -> YAML or JSON text, for `keepsrc render` and the golden files."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from keepsrc.snapshots.snapshot import SHORT_NAMES, TYPE_ORDER, Snapshot


class _Dumper(yaml.SafeDumper):
    """Block-style YAML that keeps protobuf's field order (Any values come back as OrderedDict)."""


_Dumper.add_representer(OrderedDict, lambda d, data: d.represent_dict(data.items()))
_Dumper.add_representer(dict, lambda d, data: d.represent_dict(data.items()))


# Map fields (a Struct's keys) come out of upb in hash order, which differs between processes;
# sorting them keeps renders and golden files stable. Only access-log formats are Structs here.
MAP_FIELDS = frozenset({"json_format"})


def _sort_maps(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: dict(sorted(item.items())) if key in MAP_FIELDS and isinstance(item, dict) else _sort_maps(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_sort_maps(item) for item in value]
    return value


def to_dict(message: Message) -> dict[str, Any]:
    result: dict[str, Any] = _sort_maps(json_format.MessageToDict(message, preserving_proto_field_name=True))
    return result


def dump(data: Any, fmt: str = "yaml") -> str:
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.dump(data, Dumper=_Dumper, default_flow_style=False, sort_keys=False, width=120)


def snapshot_dict(node: str, snapshot: Snapshot) -> dict[str, Any]:
    """A node's resources grouped by type, in push order, with the versions Envoy will report."""
    return {
        "node": node,
        "version": snapshot.version_info,
        "resources": {
            f"{SHORT_NAMES[type_url]}s": [
                {"name": r.name, "version": r.version, "resource": to_dict(r.message)}
                for r in snapshot.of_type(type_url).values()
            ]
            for type_url in TYPE_ORDER
        },
    }
