"""`keepsrc` command line: validate | render | explain | bootstrap | certs | netplan | serve | push | status | demo."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path, PurePosixPath

from keepsrc.certs import DEFAULT_SERVER_NAMES, write_pki
from keepsrc.demo.cli import add_demo_arguments, run_demo
from keepsrc.explain import explain, render_text
from keepsrc.explain import to_json as explain_json
from keepsrc.netplan.cli import add_netplan_arguments, run_netplan
from keepsrc.server.auth import DEFAULT_TRUST_DOMAIN
from keepsrc.server.cli import add_serve_arguments, add_store_arguments, run_serve, store_from_args
from keepsrc.server.status import add_status_arguments, run_status
from keepsrc.snapshots.bootstrap import XdsApi, XdsTls, XdsTransport, static_bootstrap, xds_bootstrap
from keepsrc.snapshots.builder import build_snapshot
from keepsrc.snapshots.render import dump, snapshot_dict, to_dict
from keepsrc.snapshots.tls import write_secret_file, write_secret_files
from keepsrc.store import ConflictError, Store, StoreError
from keepsrc.topology.diagnostics import Severity
from keepsrc.topology.loader import check_topology
from keepsrc.topology.model import SocketAddress, Topology


def builtin_example() -> Path:
    """The topology `keepsrc serve` uses when given no file (shipped inside the package)."""
    return Path(str(resources.files("keepsrc") / "examples" / "quickstart.yaml"))


def host_port(text: str, lowest_port: int = 1) -> SocketAddress:
    """argparse type for HOST:PORT or [IPv6]:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not lowest_port <= int(port) <= 65535 or not host:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not HOST:PORT with a port from {lowest_port} to 65535 (e.g. 127.0.0.1:9901 or [::1]:9901)"
        )
    return SocketAddress(host.strip("[]"), int(port))


def xds_target(text: str) -> SocketAddress | PurePosixPath:
    """argparse type for the keepsrc server: HOST:PORT, [IPv6]:PORT or unix:/absolute/path."""
    if text.startswith("unix:"):
        path = PurePosixPath(text.removeprefix("unix:"))
        if not path.is_absolute():
            raise argparse.ArgumentTypeError(f"'{text}': a unix socket needs an absolute path (unix:/run/keepsrc.sock)")
        return path
    return host_port(text)


def xds_targets(text: str) -> list[SocketAddress | PurePosixPath]:
    """argparse type for --xds: one target, or a comma list of replicas."""
    return [xds_target(item.strip()) for item in text.split(",")]


def admin_host_port(text: str) -> SocketAddress:
    """Like host_port, but port 0 lets Envoy pick a free admin port (find it with --admin-address-path)."""
    return host_port(text, lowest_port=0)


def _load(path: Path, quiet_warnings: bool = False) -> Topology | None:
    """Load a topology, printing every diagnostic to stderr; None when it has errors."""
    topology, diagnostics = check_topology(path)
    for diagnostic in diagnostics:
        if not (quiet_warnings and diagnostic.severity is Severity.WARNING):
            print(diagnostic, file=sys.stderr)
    if topology is None:
        errors = sum(1 for d in diagnostics if d.severity is Severity.ERROR)
        print(f"{path}: {errors} error(s); nothing rendered", file=sys.stderr)
    return topology


def _pick_node(topology: Topology, path: Path, node: str | None) -> str | None:
    names = list(topology.proxies)
    if node is None and len(names) == 1:
        return names[0]
    if node is None:
        print(f"{path} has several proxies; choose one with --node: {', '.join(names)}", file=sys.stderr)
        return None
    if node not in topology.proxies:
        print(f"unknown node '{node}'; proxies in {path}: {', '.join(names) or 'none'}", file=sys.stderr)
        return None
    return node


def cmd_validate(args: argparse.Namespace) -> int:
    topology = _load(args.file)
    if topology is None:
        return 1
    # Valid config can still lose the client address between hops: say where, without failing.
    for path in explain(topology):
        for finding in path.findings:
            print(f"{args.file}: {finding.severity}: {finding.where}: {finding.message} (fix: {finding.fix})",
                  file=sys.stderr)
    listeners = sum(len(p.listeners) for p in topology.proxies.values())
    print(
        f"{args.file}: ok ({len(topology.proxies)} proxies, {listeners} listeners, {len(topology.services)} services)"
    )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    topology = _load(args.file, quiet_warnings=True)
    if topology is None:
        return 2
    try:
        paths = explain(topology, args.start)
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2
    sys.stdout.write(dump(explain_json(paths), "json") if args.format == "json" else render_text(paths))
    return 1 if any(p.lost for p in paths) else 0


def cmd_render(args: argparse.Namespace) -> int:
    topology = _load(args.file, quiet_warnings=True)
    if topology is None:
        return 1
    if args.static:
        write_secret_files(topology)  # the static Envoy reads its certificates through these files
        node = _pick_node(topology, args.file, args.node)
        if node is None:
            return 2
        sys.stdout.write(dump(to_dict(static_bootstrap(topology, node, args.admin)), args.format))
        return 0
    if args.node is not None and _pick_node(topology, args.file, args.node) is None:
        return 2
    nodes = [args.node] if args.node else list(topology.proxies)
    rendered = [snapshot_dict(node, build_snapshot(topology, node)) for node in nodes]
    sys.stdout.write(dump(rendered[0] if args.node else rendered, args.format))
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    targets = [t for group in args.xds or [[SocketAddress("127.0.0.1", 18000)]] for t in group]
    addresses = [t for t in targets if isinstance(t, SocketAddress)]
    if len(addresses) != len(targets) and len(targets) > 1:
        print("keepsrc bootstrap: a unix socket is one server; replicas are HOST:PORT addresses", file=sys.stderr)
        return 2
    xds = targets[0] if len(targets) == 1 else addresses
    tls = None
    if any((args.tls_ca, args.tls_cert, args.tls_key)):
        if not all((args.tls_ca, args.tls_cert, args.tls_key)):
            args.parser.error("--tls-ca, --tls-cert and --tls-key go together (mutual TLS)")
        tls = XdsTls(str(Path(args.tls_ca).resolve()), str(Path(args.tls_cert).resolve()),
                     str(Path(args.tls_key).resolve()), args.tls_server_name)
        try:
            write_secret_file(tls.certificate())  # what the bootstrap's SDS config points at
        except OSError as exc:
            # A bootstrap made for another host: the SDS file must be made there, beside the certificate.
            print(f"keepsrc bootstrap: cannot write the SDS file beside {args.tls_cert} ({exc.strerror or exc}); "
                  "run `keepsrc bootstrap` with the same --tls-* options on the Envoy's host, where the "
                  "certificate is, to write it", file=sys.stderr)
    bootstrap = xds_bootstrap(
        args.node, xds, args.admin, XdsApi(args.api), XdsTransport(args.transport), args.cluster, args.replicas, tls
    )
    sys.stdout.write(dump(to_dict(bootstrap), args.format))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    proxies = list(args.proxy)
    if args.topology is not None:
        topology = _load(args.topology, quiet_warnings=True)
        if topology is None:
            return 1
        proxies += list(topology.proxies)
    written = write_pki(args.directory, proxies, args.trust_domain, args.server_name or DEFAULT_SERVER_NAMES,
                        args.days)
    for path in written:
        print(path)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Validate as `validate` does, then write atomically: only over the revision read just
    before (or --if-revision), so two pushes at once cannot overwrite each other unseen."""
    store = store_from_args(args.parser, args, args.store)
    if not store.shared:
        args.parser.error(f"push writes to a store replicas share (etcd://...), not to {store.name}")
    code = cmd_validate(args)
    if code:
        print(f"{args.file}: not pushed", file=sys.stderr)
        return code
    try:
        data = args.file.read_bytes()
        revision = asyncio.run(_push(store, data, args.if_revision))
    except ConflictError as exc:
        print(f"keepsrc push: not pushed: {exc}", file=sys.stderr)
        return 3
    except (StoreError, OSError) as exc:
        print(f"keepsrc push: not pushed: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: pushed to {store.name} at revision {revision}")
    return 0


async def _push(store: Store, data: bytes, expected: int | None) -> int:
    from keepsrc.store.etcd import EtcdStore

    assert isinstance(store, EtcdStore)
    try:
        if expected is None:
            expected = await store.latest_revision()
        return await store.write(data, expected or None)  # 0 or None: the key must not exist yet
    finally:
        await store.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keepsrc", description="An Envoy control plane that keeps the real client address end to end."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", help="check a topology file; errors as file:line:col")
    validate.add_argument("file", type=Path)
    validate.set_defaults(run=cmd_validate)

    render = commands.add_parser("render", help="print a node's Envoy resources, or a static bootstrap")
    render.add_argument("file", type=Path)
    render.add_argument("--node", help="proxy name (Envoy node id); default: every proxy")
    render.add_argument("--static", action="store_true", help="a complete static Envoy config for --node")
    render.add_argument("--admin", type=admin_host_port, default=SocketAddress("127.0.0.1", 9901),
                        help="admin address in the --static config (default 127.0.0.1:9901)")
    render.add_argument("--format", choices=["yaml", "json"], default="yaml")
    render.set_defaults(run=cmd_render)

    explain_cmd = commands.add_parser(
        "explain", help="walk every path; show where the client address is kept or lost (exit 1 if lost)"
    )
    explain_cmd.add_argument("file", type=Path)
    explain_cmd.add_argument("--from", dest="start", metavar="LISTENER",
                             help="start at this listener (name or proxy/listener); default: every entry listener")
    explain_cmd.add_argument("--format", choices=["text", "json"], default="text")
    explain_cmd.set_defaults(run=cmd_explain)

    bootstrap = commands.add_parser("bootstrap", help="an Envoy bootstrap that gets its config from keepsrc")
    bootstrap.add_argument("--node", required=True, help="the Envoy's node.id")
    bootstrap.add_argument("--cluster", help="the Envoy's node.cluster (default: the node id); a fleet of "
                           "Envoys with one cluster name shares the proxy entry of that name")
    bootstrap.add_argument("--xds", type=xds_targets, action="append", metavar="ADDRESS",
                           help="the keepsrc server: HOST:PORT or unix:/path (default 127.0.0.1:18000); replicas "
                           "of one store: --xds A --xds B, or A,B")
    bootstrap.add_argument("--replicas", action="store_true",
                           help="the one --xds name resolves to every replica (STRICT_DNS): reconnect fast, with "
                           "keepalive (implied by several --xds)")
    bootstrap.add_argument("--admin", type=admin_host_port, default=SocketAddress("127.0.0.1", 9901),
                           help="Envoy's admin address (default 127.0.0.1:9901)")
    bootstrap.add_argument("--api", choices=[a.value for a in XdsApi], default=XdsApi.SOTW.value,
                           help="state-of-the-world or incremental (delta) xDS (default sotw)")
    bootstrap.add_argument("--transport", choices=[t.value for t in XdsTransport], default=XdsTransport.ADS.value,
                           help="one aggregated stream (ads, default) or one stream per type")
    bootstrap.add_argument("--format", choices=["yaml", "json"], default="yaml")
    tls = bootstrap.add_argument_group("mutual TLS to keepsrc (serve --client-ca)")
    tls.add_argument("--tls-ca", metavar="PEM", help="CA keepsrc's certificate must chain to")
    tls.add_argument("--tls-cert", metavar="PEM", help="the Envoy's certificate (keepsrc certs: proxies/NODE.pem); "
                     "read through a file-based SDS secret written beside it, so a renewal needs no restart")
    tls.add_argument("--tls-key", metavar="PEM", help="its private key")
    tls.add_argument("--tls-server-name", metavar="NAME", help="the name keepsrc's certificate must carry (SNI)")
    bootstrap.set_defaults(run=cmd_bootstrap, parser=bootstrap)

    certs = commands.add_parser("certs", help="a development CA and certificates for mutual TLS between keepsrc "
                                "and its Envoys (SPIFFE IDs per proxy entry)")
    certs.add_argument("directory", type=Path)
    certs.add_argument("topology", type=Path, nargs="?", help="a certificate for each of its proxy entries")
    certs.add_argument("--proxy", action="append", default=[], metavar="NAME", help="a certificate for this entry")
    certs.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="(default: %(default)s)")
    certs.add_argument("--server-name", action="append", metavar="NAME",
                       help="a DNS name or IP address keepsrc is reached at (default: localhost, 127.0.0.1, ::1)")
    certs.add_argument("--days", type=int, default=30, help="validity of the leaf certificates (default: 30)")
    certs.set_defaults(run=cmd_certs)

    netplan = commands.add_parser("netplan", help="the host iptables/ip-rule plan original_src needs; --apply/--remove")
    add_netplan_arguments(netplan)
    netplan.set_defaults(run=run_netplan)

    serve = commands.add_parser("serve", help="serve the topology to Envoys over gRPC ADS; reload on change")
    add_serve_arguments(serve)
    serve.set_defaults(run=run_serve)

    push = commands.add_parser("push", help="validate a topology, then write it to the store replicas share "
                               "(exit 1 invalid, 2 store unreachable, 3 someone else pushed meanwhile)")
    push.add_argument("file", type=Path)
    add_store_arguments(push, required=True)
    push.add_argument("--if-revision", type=int, metavar="REVISION",
                      help="write only if the store is still at this revision (what you based the edit on)")
    push.set_defaults(run=cmd_push, parser=push)

    status = commands.add_parser("status", help="what every connected Envoy ACKed or NACKed (exit 1 on a NACK)")
    add_status_arguments(status)
    status.set_defaults(run=run_status)

    demo = commands.add_parser("demo", help="run the talk's scenarios on real Envoys; print what backends saw")
    add_demo_arguments(demo)
    demo.set_defaults(run=run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `keepsrc render ... | head`
        return 0
