"""`keepsrc demo`: run the talk's scenarios with real Envoys and print what each backend saw.

As root, every host is a network namespace (cleaned up on exit and on Ctrl-C); otherwise the
scenarios loopback allows run on 127.18.0.0/16 and the rest are listed as skipped, with why.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from keepsrc.demo.envoy import EnvoyMissing, envoy_path
from keepsrc.demo.hosts import LoopbackNetwork, NamespaceNetwork, Network
from keepsrc.demo.netns import sweep_leftovers
from keepsrc.demo.scenarios import SCENARIOS, Demo, Row, Scenario, Skip


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", metavar="N",
                        help="run only scenario N (e.g. 4), or those whose name starts with N; repeatable")
    parser.add_argument("--loopback", action="store_true",
                        help="use loopback even as root (skips what needs namespaces)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")


def _missing(scenario: Scenario, netns: bool) -> str | None:
    if not netns and scenario.loopback is None:
        return scenario.why_netns
    needs = scenario.needs if netns else scenario.loopback_needs
    absent = [b for b in needs if not (shutil.which(b) or Path("/usr/sbin", b).exists())]
    if absent:
        return f"not installed: {', '.join(absent)} (scripts/setup installs them as root)"
    return None


def _selects(only: str, name: str) -> bool:
    """`--only 1` is scenario 1 (not 10); a longer text picks the names it starts."""
    return name.split(" ", 1)[0] == only if only.isdigit() else name.startswith(only)


def run_scenarios(network: Network, workdir: Path, only: list[str] | None = None,
                  progress: Callable[[str], None] = print) -> tuple[list[Row], list[Skip]]:
    """Every selected scenario on `network`; failures to deploy become FAIL rows, not crashes."""
    demo = Demo(network, workdir, progress)
    rows: list[Row] = []
    skips: list[Skip] = []
    for scenario in SCENARIOS:
        if only and not any(_selects(prefix, scenario.name) for prefix in only):
            continue
        reason = _missing(scenario, network.netns)
        if reason:
            skips.append(Skip(scenario.name, reason))
            continue
        progress(f"{scenario.name} ...")
        run = scenario.run if network.netns else scenario.loopback
        assert run is not None
        try:
            rows.extend(run(demo))
        except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
            rows.append(Row(scenario.name, f"could not run: {str(exc).splitlines()[0]}", "error", "a run"))
    return rows, skips


def render_table(rows: list[Row], skips: list[Skip]) -> str:
    headers = ("scenario", "path", "backend saw", "expected", "")
    table = [(r.scenario, r.path, r.seen, r.expected, "PASS" if r.passed else "FAIL") for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    for skip in skips:
        lines.append(f"{skip.scenario}: SKIPPED: {skip.reason}")
    passed = sum(r.passed for r in rows)
    lines.append(f"{passed} passed, {len(rows) - passed} failed, {len(skips)} scenarios skipped")
    return "\n".join(lines) + "\n"


def run_demo(args: argparse.Namespace) -> int:
    try:
        envoy_path()
    except EnvoyMissing as exc:
        print(f"keepsrc demo: {exc}", file=sys.stderr)
        return 2
    netns = os.geteuid() == 0 and not args.loopback and shutil.which("ip") is not None
    print(f"keepsrc demo: {'network namespaces' if netns else 'loopback (not root: no namespaces)'}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="keepsrc-demo-"))
    network: Network | None = None
    try:
        if netns:
            sweep_leftovers()
        network = NamespaceNetwork() if netns else LoopbackNetwork()
        rows, skips = run_scenarios(network, workdir, args.only, lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("keepsrc demo: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if network is not None:
            network.close()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.write(render_table(rows, skips))
    return 0 if all(r.passed for r in rows) and rows else 1
