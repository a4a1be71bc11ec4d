"""`keepsrc serve`: the xDS server for a topology file or a shared store, with hot reload, SIGHUP
and clean SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import logging
import signal
from pathlib import Path

from keepsrc.server import csds, logs, metrics, workers
from keepsrc.server.auth import DEFAULT_TRUST_DOMAIN, Authorizer, ServerTls
from keepsrc.server.cache import SnapshotCache
from keepsrc.server.reload import TopologySource
from keepsrc.server.service import start
from keepsrc.store import LocalStore, Store, open_store

log = logging.getLogger("keepsrc.server")
# Python's cycle collector, tuned for a server holding thousands of streams. With the defaults
# (700, 10, 10), the objects of a push (responses, tasks, awaitables, all freed within the push)
# outlive two young collections, are promoted, and soon make the collector walk the whole heap: at
# 10,000 streams ~900,000 objects, 300-500 ms with the GIL held, 28 times in 6 pushes. Young
# collections every 10,000 allocations let them die young, and a full one is considered 10x less
# often: 2 full collections in the run, both at start; pushes 40% faster, 37% less CPU, longest
# pause 163 ms (bench_ads.py, 10,000 streams, one worker; the cache's own objects are long-lived).
SERVING_GC_THRESHOLDS = (10_000, 10, 100)


def add_store_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--store and the TLS options of etcd (serve and push)."""
    parser.add_argument("--store", required=required, metavar="URL",
                        help="etcd://HOST:PORT[,HOST:PORT...]/PREFIX: the topology is the key PREFIX/topology.yaml, "
                        "shared by every replica that serves it" + ("" if required else "; or a file path"))
    tls = parser.add_argument_group("TLS to etcd")
    tls.add_argument("--etcd-ca", type=Path, metavar="PEM", help="CA certificate etcd's certificate is checked "
                     "against; turns TLS on")
    tls.add_argument("--etcd-cert", type=Path, metavar="PEM", help="client certificate (etcd --client-cert-auth)")
    tls.add_argument("--etcd-key", type=Path, metavar="PEM", help="the client certificate's private key")
    tls.add_argument("--etcd-server-name", metavar="NAME",
                     help="the name etcd's certificate must carry (default: the first host of the URL)")


def store_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, where: str | Path | None) -> Store:
    """The store `where` names, with the TLS options; exits with a usage error on a bad URL."""
    tls = None
    tls_options = (args.etcd_cert, args.etcd_key, args.etcd_server_name)
    if args.etcd_ca is None and any(option is not None for option in tls_options):
        parser.error("--etcd-cert, --etcd-key and --etcd-server-name need --etcd-ca (TLS)")
    if (args.etcd_cert is None) != (args.etcd_key is None):
        parser.error("--etcd-cert and --etcd-key go together")
    if args.etcd_ca is not None:
        from keepsrc.store.etcd import EtcdTls

        tls = EtcdTls(args.etcd_ca, args.etcd_cert, args.etcd_key, args.etcd_server_name)
    try:
        return open_store(where, tls)
    except ValueError as exc:
        parser.error(str(exc))


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topology", nargs="?", type=Path,
                        help="topology YAML to serve and watch (default: the built-in quickstart example)")
    add_store_arguments(parser)
    parser.add_argument("--listen", default="127.0.0.1:18000", metavar="HOST:PORT",
                        help="address of the xDS gRPC server (default: %(default)s)")
    parser.add_argument("--debounce-ms", type=int, default=200, metavar="MS",
                        help="a save is read as soon as its writer closes the file (or renames it into place); "
                        "a file removed waits this long for its replacement before it is reported missing "
                        "(default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="info logs every ACK and NACK per node (default: %(default)s)")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one object per line; ACK/NACK lines carry node, type, version and nonce")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: none)")
    tls = parser.add_argument_group("mutual TLS and authorization (keepsrc certs makes development files)")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM", help="the server's certificate; re-read when it changes")
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")
    tls.add_argument("--client-ca", type=Path, metavar="PEM",
                     help="CA an Envoy's certificate must chain to; each Envoy is served only the proxy entry its "
                     "SPIFFE ID names: spiffe://TRUST-DOMAIN/keepsrc/ENTRY, or one of the entry's `identities`")
    tls.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="(default: %(default)s)")
    tls.add_argument("--admin-identity", action="append", default=[], metavar="SPIFFE-ID",
                     help="may read every node's status (CSDS); spiffe://TRUST-DOMAIN/keepsrc-admin always may")
    tls.add_argument("--insecure", action="store_true",
                     help="serve plaintext on an address other than loopback: anyone who reaches it gets every "
                     "proxy's config")
    parser.add_argument("--unix-mode", type=lambda text: int(text, 8), default=0o660, metavar="OCTAL",
                        help="permissions of a unix:/path socket (default: 0660)")
    parser.add_argument("--unix-group", metavar="GROUP", help="group of a unix:/path socket")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="server processes sharing the port (SO_REUSEPORT), each holding its share of the "
                        "Envoys; a worker that exits is started again (default: one per core; 1 on a unix socket)")
    # Set by the supervisor on the processes it starts (see workers.py).
    parser.add_argument("--worker", type=workers.Worker.parse, help=argparse.SUPPRESS)
    parser.set_defaults(parser=parser)


def _security(args: argparse.Namespace) -> tuple[ServerTls | None, Authorizer | None]:
    """TLS and authorization from the flags; a usage error for plaintext beyond loopback without --insecure."""
    files = (args.tls_cert, args.tls_key, args.client_ca)
    if any(f is not None for f in files) and not all(f is not None for f in files):
        args.parser.error("--tls-cert, --tls-key and --client-ca go together (mutual TLS)")
    if args.tls_cert is None:
        if not _local(args.listen) and not args.insecure:
            args.parser.error(f"{args.listen} is reachable from the network: serve it with --tls-cert, --tls-key "
                              "and --client-ca, or say --insecure")
        return None, None
    return (ServerTls(args.tls_cert, args.tls_key, args.client_ca),
            Authorizer(args.trust_domain, frozenset(args.admin_identity)))


def _local(listen: str) -> bool:
    if listen.startswith("unix:"):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_serve(args: argparse.Namespace) -> int:
    if args.worker is not None:
        args = args.worker.arguments(args)
    if args.topology is not None and args.store is not None:
        args.parser.error(f"serve either {args.topology} or --store {args.store}, not both")
    count = workers.default_workers(args.listen) if args.workers is None else args.workers
    if count < 1:
        args.parser.error("--workers must be at least 1")
    store = store_from_args(args.parser, args, args.store or args.topology)
    logs.configure(args.log_level, args.log_format)
    if count > 1 and args.worker is None:
        _security(args)  # a usage error stops here, not in every worker
        return workers.supervise(args, count)
    if args.worker is not None:
        args.worker.die_with_supervisor()
        # The supervisor serves /metrics for all; this worker's go to the run directory.
        metrics.for_worker(args.worker.index)
    elif args.metrics:
        try:
            metrics.serve_metrics(args.metrics)
        except (OSError, ValueError) as exc:
            log.error("cannot serve metrics on %s: %s", args.metrics, exc)
            return 1
        log.info("metrics on http://%s/metrics", args.metrics)
    gc.set_threshold(*SERVING_GC_THRESHOLDS)
    try:
        return asyncio.run(_serve(args, store))
    finally:
        if args.worker is not None:
            args.worker.leave()


async def _serve(args: argparse.Namespace, store: Store) -> int:
    cache = SnapshotCache()
    source = TopologySource(cache, store)
    # A file must load before anything is served: a typo fails the start, where it is seen. A
    # shared store is another matter: a replica starts whatever it holds (empty, invalid,
    # unreachable), says NOT_SERVING and refuses streams until it has a topology, and keeps trying.
    worker: workers.Worker | None = args.worker
    if isinstance(store, LocalStore) and not source.load():
        if worker is None or worker.starts == 0:
            return 2
        # A worker started again after a crash, with the file broken since: exiting would only
        # crash-loop. It waits, NOT_SERVING, for a good file; the other workers keep serving.
        log.error("worker %d: %s does not load; NOT_SERVING until it does", worker.index, store.name)
    tls, authorizer = _security(args)
    if tls is None and not _local(args.listen):
        log.warning("serving PLAINTEXT on %s (--insecure): anyone who can reach it is served every proxy's "
                    "config; use --tls-cert/--tls-key/--client-ca", args.listen)
    try:
        server = await start(cache, args.listen, tls, authorizer, args.unix_mode, args.unix_group, worker=worker)
        private = None if worker is None else await csds.serve_private(cache, worker.socket)
    except (OSError, LookupError) as exc:
        log.error("%s", exc)
        return 1
    if worker is not None:
        worker.mark_started()
    if not cache.loaded:
        log.info("serving %s; NOT_SERVING until a topology is loaded from it", store.name)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, source)
    watcher = asyncio.create_task(source.watch(stop, args.debounce_ms))
    await stop.wait()
    log.info("shutting down: closing every stream")
    await server.stop(grace=1.0)
    if private is not None:
        await private.stop(None)
    await watcher
    await store.close()
    return 0


def _on_sighup(source: TopologySource) -> None:
    log.info("SIGHUP; reloading %s", source.name)
    source.reload_soon(force=True)  # off the event loop, so the streams keep being served
