"""Stage 0: where the topology comes from. A local file (or the built-in example), or etcd, which
several keepsrc replicas share. Imports point down: store -> topology; the server reads a Store.

    etcd://HOST:PORT[,HOST:PORT...]/PREFIX    the key PREFIX/topology.yaml in etcd
    PATH (or file:PATH)                        a topology file on this machine
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from keepsrc.store.base import ConflictError, Content, Store, StoreError, check_content
from keepsrc.store.file import BUILTIN_NAME, BuiltinStore, FileStore, LocalStore

if TYPE_CHECKING:
    from keepsrc.store.etcd import EtcdStore, EtcdTls

__all__ = [
    "BUILTIN_NAME", "BuiltinStore", "ConflictError", "Content", "FileStore", "LocalStore", "Store", "StoreError",
    "check_content", "open_etcd", "open_store", "parse_etcd_url",
]

ETCD_SCHEME = "etcd://"


def parse_etcd_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """etcd://HOST:PORT[,HOST:PORT...]/PREFIX -> ([(host, port), ...], "/PREFIX"); ValueError if not."""
    example = "e.g. etcd://127.0.0.1:2379,127.0.0.2:2379/keepsrc/prod"
    if not url.startswith(ETCD_SCHEME):
        raise ValueError(f"'{url}' is not an etcd URL ({example})")
    hosts, slash, prefix = url.removeprefix(ETCD_SCHEME).partition("/")
    prefix = "/" + prefix.strip("/")
    if not slash or prefix == "/":
        raise ValueError(f"'{url}' names no key prefix after the hosts ({example})")
    endpoints = []
    for item in hosts.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"'{item}' in '{url}' is not HOST:PORT ({example})")
        endpoints.append((host, int(port)))
    return endpoints, prefix


def open_etcd(url: str, tls: EtcdTls | None = None) -> EtcdStore:
    """The etcd store at `url` (imports the etcd client only now: local files never need it)."""
    from keepsrc.store.etcd import EtcdStore

    endpoints, prefix = parse_etcd_url(url)
    return EtcdStore(endpoints, prefix, tls)


def open_store(where: str | Path | None, tls: EtcdTls | None = None) -> Store:
    """A store from what a user typed: an etcd URL, a path (or file:PATH), or None for the built-in example."""
    if where is None:
        return BuiltinStore()
    if isinstance(where, str) and where.startswith(ETCD_SCHEME):
        return open_etcd(where, tls)
    return FileStore(Path(str(where).removeprefix("file:")))
