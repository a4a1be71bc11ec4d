"""`keepsrc netplan FILE --node N [--apply | --remove | --check]`; keepsrc/cli.py mounts it as a subcommand."""

from __future__ import annotations

import argparse
import sys

from keepsrc.netplan.apply import ApplyError, apply, remove
from keepsrc.netplan.check import check, render_check
from keepsrc.netplan.plan import PlanError, plan_for, render
from keepsrc.topology.diagnostics import TopologyError
from keepsrc.topology.loader import load_topology


def add_netplan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Print, apply or remove the host plan (mangle CONNMARK rules, ip rules and routes, sysctls)"
        " that sends the upstream's replies back to Envoy for listeners with original_src."
        " --apply, --remove and --check act on the current network namespace (use `ip netns exec NAME`"
        " for another) and need root."
    )
    parser.add_argument("file", metavar="FILE", help="topology YAML")
    parser.add_argument("--node", required=True, help="the proxy (Envoy node) whose host this is")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--apply", action="store_true", help="apply the plan idempotently")
    action.add_argument("--remove", action="store_true",
                        help="remove everything keepsrc's netplan added here and restore what it changed")
    action.add_argument("--check", action="store_true",
                        help="report, per item of the plan, whether it is in place here; exit 1 if anything is"
                             " missing or drifted (a missing 127/8 guard while route_localnet=1 is named DANGER)")


def run_netplan(args: argparse.Namespace) -> int:
    try:
        topology = load_topology(args.file)
    except TopologyError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.node not in topology.proxies:
        known = ", ".join(topology.proxies) or "none"
        print(f"{args.file}: no proxy named '{args.node}'; proxies in this file: {known}", file=sys.stderr)
        return 2
    try:
        plan = plan_for(topology, args.node)
    except PlanError as exc:
        for path, message in exc.problems:
            print(f"{args.file}: {path}: {message}", file=sys.stderr)
        return 1
    if not (args.apply or args.remove or args.check):
        sys.stdout.write(render(plan, args.file))
        return 0
    notes: list[str] = []
    try:
        if args.check:
            report = check(plan)
            sys.stdout.write(render_check(report, args.file))
            return 0 if report.ok else 1
        changes = apply(plan) if args.apply else remove(plan, notes)
    except ApplyError as exc:
        print(f"keepsrc netplan: {exc}", file=sys.stderr)
        return 1
    for change in changes:
        print(change)
    for note in notes:
        print(f"keepsrc netplan: note: {note}", file=sys.stderr)
    if not changes:
        print("keepsrc netplan: already " + ("applied" if args.apply else "removed") + "; nothing changed")
    return 0
