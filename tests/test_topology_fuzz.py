"""Fuzzing the topology stage with mutants of the shipped topologies (fixed seed, bounded in time).

For every mutant: validation raises nothing, every finding is one line starting with file:line:col,
and it takes under 2 s (a generous guard against a super-linear case, the only timing in the tests).
A sample of the accepted mutants is rendered statically and must pass a real Envoy's validation:
whatever keepsrc accepts, Envoy must accept too.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest

from keepsrc.snapshots.bootstrap import static_bootstrap
from keepsrc.snapshots.render import to_dict
from keepsrc.topology import SocketAddress, Topology, check_topology_text
from keepsrc.topology.loader import check_plain, check_precisely
from tests.test_envoy_static import _envoy_check, _has_proxy_protocol_health_check

ROOT = Path(__file__).resolve().parent.parent
SEEDS = [*sorted((ROOT / "keepsrc" / "examples").glob("*.yaml")), *sorted((ROOT / "tests/golden/in").glob("*.yaml"))]
MUTANTS = 2000
DIFFERENTIAL_MUTANTS = 4000
ENVOY_SAMPLE = 40
SEED = 20_260_611
PER_MUTANT_LIMIT_S = 2.0
LINE_RE = re.compile(r"fuzz\.yaml:[0-9]+:[0-9]+: (error|warning): \S")
VALUE_RE = re.compile(r"(?P<lead>^\s*(?:- )?[A-Za-z_]+: |[{,] ?[A-Za-z_]+: |\[|, )(?P<value>[^,\]}\n]+)", re.M)


def interesting_values(log_dir: Path) -> list[str]:
    """Values at and past every bound, of every wrong type, and text no topology should hold."""
    return [
        "0", "1", "-1", "65535", "65536", "4294967295", "4294967296", "2147483647", "255", "256", "32", "33",
        "100", "101", "1ms", "0.5ms", "9223372035s", "9223372036s", "153722867m", "315576000001s", "1e400",
        "0x7fffffffffffffff", "99999999999999999999999", "1:2:3", "true", "no", "~", "''", "null", "2001-12-14",
        "[]", "{}", "[1, [2]]", "!!int abc", "!!binary aGk=", "!custom x", "&a x", "*a", "'a\\nb'", '"\\x00\\e"',
        '"\\ud800"', '"/caf\\u00e9"', "/a b", "/", "/api", "/api/", "'/" + "p" * 4100 + "'", "n" * 255, "n" * 256,
        "0.0.0.0:80", "[::]:80", "[::1]:65535", "[fe80::1%eth0]:80", "::1:80", "127.0.0.1", "http://x:80",
        "example.com:80", "a" * 64 + ".example:80", "-bad-.x:80", "10.0.0.0/8", "10.0.0.1/8", "fe80::/10",
        "tcp", "udp", "http", "v1", "v2", "v3", "ring_hash", "maglev", "client_ip", "direct_peer", "gateway",
        "local", "eth1", "an-interface-name", "stdout", "stderr", "relative.log", f"{log_dir}/access.log",
        f"{log_dir}/" + "l" * 251 + ".log", f"{log_dir}/" + "l" * 252 + ".log", f"{log_dir}/", "\t", "é",
        # Read one way by YAML 1.1 (PyYAML, the precise pass) and another by YAML 1.2 (yaml-rs, the plain pass).
        "017", "0o17", "0b11", "1_000", "+5", "0x10", "190:20:30", "on", "Off", "yes", "'017'", "'on'", "1e3",
        "1.2", "1.20", ".inf", "0.", "2001-12-14 21:59:43", "=", "'<<'",
    ]


TOKENS = ["\n", "  ", "- ", ": ", "[", "]", "{", "}", ",", "'", '"', "#", "&x ", "*x", "<<: ", "---\n", "\t", "?", "|"]


def mutate(text: str, rng: random.Random, values: list[str]) -> str:
    """One to three edits: a value replaced, a line deleted, duplicated or re-indented, a token inserted."""
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        lines = text.split("\n")
        if kind < 0.55:
            spots = list(VALUE_RE.finditer(text))
            if spots:
                spot = rng.choice(spots)
                text = text[: spot.start("value")] + rng.choice(values) + text[spot.end("value") :]
        elif kind < 0.7:
            del lines[rng.randrange(len(lines))]
            text = "\n".join(lines)
        elif kind < 0.8:
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            text = "\n".join(lines)
        elif kind < 0.9:
            i = rng.randrange(len(lines))
            lines[i] = " " * rng.choice([0, 1, 2, 4, 6, 8]) + lines[i].lstrip(" ")
            text = "\n".join(lines)
        else:
            at = rng.randrange(len(text) + 1)
            text = text[:at] + rng.choice(TOKENS) + text[at:]
    return text


def renders(topology: Topology) -> list[str]:
    """The proxies worth an Envoy run: those with a listener."""
    return [name for name, proxy in topology.proxies.items() if proxy.listeners]


def test_mutants_get_diagnostics_and_accepted_ones_pass_envoy(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    values = interesting_values(log_dir)
    rng = random.Random(SEED)
    seeds = [path.read_text() for path in SEEDS]
    accepted: list[tuple[str, Topology]] = []
    rejected = 0
    for _ in range(MUTANTS):
        mutant = mutate(rng.choice(seeds), rng, values)
        start = time.perf_counter()
        topology, diagnostics = check_topology_text(mutant, "fuzz.yaml")  # any exception fails the test
        elapsed = time.perf_counter() - start
        assert elapsed < PER_MUTANT_LIMIT_S, f"{elapsed:.1f}s to validate:\n{mutant}"
        for diagnostic in diagnostics:
            line = str(diagnostic)
            assert line.splitlines() == [line] and line.isprintable(), repr(line)
            assert LINE_RE.match(line), line
        if topology is None:
            rejected += 1
        elif mutant not in seeds and renders(topology):
            accepted.append((mutant, topology))
    # The mutator has to reach both sides, or the properties above say little.
    assert rejected > MUTANTS // 4 and len(accepted) >= ENVOY_SAMPLE, (rejected, len(accepted))

    for i, (mutant, topology) in enumerate(rng.sample(accepted, ENVOY_SAMPLE)):
        node = rng.choice(renders(topology))
        config = to_dict(static_bootstrap(topology, node, SocketAddress("127.0.0.1", 0)))
        clusters = config["static_resources"]["clusters"]
        # As in test_envoy_static: Envoy 1.40's --mode validate crashes on a TCP health check with
        # proxy_protocol_config, so such clusters are initialised for real.
        real = [c for c in clusters if _has_proxy_protocol_health_check(c)]
        try:
            if real:
                _envoy_check({**config, "static_resources": {"clusters": real}}, tmp_path / f"{i}-c.json", "init_only")
                without = [{**c, "health_checks": []} if c in real else c for c in clusters]
                config["static_resources"]["clusters"] = without
            _envoy_check(config, tmp_path / f"{i}.json", "validate")
        except AssertionError as exc:
            pytest.fail(f"keepsrc accepted this mutant (node {node}) and Envoy refused it:\n{mutant}\n{exc}")


def test_the_plain_pass_accepts_only_what_the_precise_pass_accepts_and_as_the_same_topology(tmp_path: Path) -> None:
    """The plain pass (yaml-rs, YAML 1.2, no positions) answers for valid files; whatever it accepts,
    the precise pass (PyYAML, YAML 1.1, every finding placed) must accept with no finding, as an
    equal Topology. Where it declines, the precise pass answers alone."""
    values = interesting_values(tmp_path)
    rng = random.Random(SEED + 1)
    seeds = [path.read_text() for path in SEEDS]
    plain_accepted = 0
    for _ in range(DIFFERENTIAL_MUTANTS):
        mutant = mutate(rng.choice(seeds), rng, values)
        plain = check_plain(mutant, "fuzz.yaml")
        precise, diagnostics = check_precisely(mutant, "fuzz.yaml")
        if plain is not None:
            plain_accepted += 1
            assert (plain, []) == (precise, diagnostics), f"the passes differ on:\n{mutant}"
        assert check_topology_text(mutant, "fuzz.yaml") == (precise, diagnostics)
    # Valid mutants are a minority; the plain pass must still have answered for many of them.
    assert plain_accepted > DIFFERENTIAL_MUTANTS // 20, plain_accepted
