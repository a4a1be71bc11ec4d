"""The topology stage on any input: work linear in the file, anchors, size, control characters, and
every bound keepsrc accepts is one a real Envoy accepts.

Work is measured by counting, never timing: the Python steps and calls into C of one validation, which
grow 4x per doubling wherever something compares every item with every other.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import pytest

from keepsrc.snapshots.bootstrap import static_bootstrap
from keepsrc.snapshots.render import to_dict
from keepsrc.topology import Severity, SocketAddress, TopologyError, check_topology, check_topology_text, load_topology
from keepsrc.topology.checker import DURATION_MAX_S, NAME_MAX, SCALAR_MAX
from keepsrc.topology.reader import MAX_BYTES_DEFAULT, MAX_BYTES_ENV
from tests.support.envoy import envoy_path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted((ROOT / "tests" / "malformed").glob("*.yaml"))
LINE_RE = re.compile(r"^(?P<file>.+?):\d+:\d+: (error|warning): ")
HEADER = "apiVersion: keepsrc/v1\n"


def steps(run: Callable[[], object]) -> int:
    """How many Python lines, calls and generator steps, and calls into C, `run` executes: a
    deterministic measure of work (settrace sees every resumption of a generator, setprofile C calls)."""
    count = 0

    def trace(frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        nonlocal count
        count += 1
        return trace

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal count
        count += event == "c_call"

    sys.settrace(trace)
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    return count


def steps_to_validate(text: str) -> int:
    return steps(lambda: check_topology_text(text, "generated.yaml"))


def services(n: int) -> str:
    return "services:\n" + "".join(f"  svc-{i}: {{endpoints: ['10.0.{i // 250}.{i % 250 + 1}:80']}}\n"
                                   for i in range(n))


def listeners_each_with_an_error(n: int) -> str:
    items = "".join(
        f"      - {{name: l{i}, address: '0.0.0.0:{i + 1}', protocol: tcp, service: svc-0, colour: red}}\n"
        for i in range(n)
    )
    return HEADER + services(1) + "proxies:\n  p:\n    listeners:\n" + items


def services_each_with_an_error(n: int) -> str:
    return HEADER + "".join(
        f"  svc-{i}: {{endpoints: [\"10.0.0.1:80\"], lb: fastest}}\n" for i in range(n)
    ).join(["services:\n", "proxies: {}\n"])


def http_listener(routes: str) -> str:
    listener = "{name: h, address: '0.0.0.0:80', protocol: http, routes: [\n" + routes + "]}"
    return f"proxies:\n  p:\n    listeners:\n      - {listener}\n"


def unknown_services_among_many(n: int) -> str:
    # n services and n/5 references to distinct unknown names: "did you mean" for each.
    routes = "".join(f"{{prefix: /r{i}, service: svc-x{i}}},\n" for i in range(n // 5))
    return HEADER + services(n) + http_listener(routes)


def routes_to_one_unknown_service(n: int) -> str:
    return HEADER + services(n // 4) + http_listener("".join(f"{{prefix: /r{i}/, service: nope}},\n" for i in range(n)))


def many_valid_routes(n: int) -> str:
    routes = "".join(f"{{prefix: /r{i}/, service: svc-{i % 50}}},\n" for i in range(n))
    return HEADER + services(50) + http_listener(routes)


def many_endpoints(n: int) -> str:
    endpoints = ", ".join(f'"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}:80"' for i in range(n))
    return HEADER + f"services:\n  web: {{endpoints: [{endpoints}]}}\nproxies: {{}}\n"


def many_cidrs(n: int) -> str:
    cidrs = ", ".join(f"10.{i // 250 % 250}.{i % 250}.0/24" for i in range(n))
    return HEADER + services(1) + "proxies:\n  p:\n    listeners:\n" \
        f"      - {{name: t, address: '0.0.0.0:1', protocol: tcp, service: svc-0, allow_from: [{cidrs}]}}\n"


GENERATORS: dict[str, Callable[[int], str]] = {
    "listeners each with an error": listeners_each_with_an_error,
    "services each with an error": services_each_with_an_error,
    "unknown services among many": unknown_services_among_many,
    "routes to one unknown service": routes_to_one_unknown_service,
    "many valid routes": many_valid_routes,
    "many endpoints": many_endpoints,
    "many CIDRs": many_cidrs,
}


@pytest.mark.parametrize("generate", GENERATORS.values(), ids=GENERATORS.keys())
def test_validation_work_grows_linearly(generate: Callable[[int], str]) -> None:
    small, large = generate(1000), generate(2000)
    assert check_topology_text(small)[1] == check_topology_text(small)[1]  # deterministic input
    ratio = steps_to_validate(large) / steps_to_validate(small)
    # Linear work doubles (plus n log n for sorting route prefixes); comparing every pair quadruples.
    assert ratio < 2.25, f"validation work grew {ratio:.2f}x when the input doubled"


def test_the_work_count_sees_quadratic_work() -> None:
    """The measure above can fail: counting errors by rescanning every finding, per item, quadruples it."""

    def count_errors_per_item(n: int) -> None:
        findings = list(range(n))
        for _ in findings:
            sum(1 for f in findings if f >= 0)

    assert steps(lambda: count_errors_per_item(400)) / steps(lambda: count_errors_per_item(200)) > 3.5


def test_nested_aliases_are_refused_at_the_first_anchor() -> None:
    # The "billion laughs": 37 levels of 15 aliases each, 3.8 KB standing for 15^37 scalars.
    levels = ["  l00: &l00 [" + ", ".join(["x"] * 15) + "]"]
    levels += [f"  l{i:02}: &l{i:02} [" + ", ".join([f"*l{i - 1:02}"] * 15) + "]" for i in range(1, 37)]
    text = HEADER + "services:\n" + "\n".join(levels) + "\nproxies: {}\n"
    assert 3700 < len(text) < 3900
    topology, diagnostics = check_topology_text(text, "laughs.yaml")
    assert topology is None
    assert [str(d) for d in diagnostics] == [
        "laughs.yaml:3:8: error: YAML anchor '&l00' is not allowed: a topology never needs anchors/aliases;"
        " they can expand without limit; write the value out"
    ]
    assert steps_to_validate(text) < 100_000  # composing stops there: nothing of the 10^10 is walked


def test_size_limit_refuses_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "big.yaml"
    file.write_text("{{{ not even YAML " * 100)  # 1,800 bytes; a syntax error if it were parsed
    topology, diagnostics = check_topology(file, max_bytes=1000)
    assert topology is None
    assert [(d.line, d.col, d.path) for d in diagnostics] == [(1, 1, "")]
    assert diagnostics[0].message.startswith(f"{file} is 1,800 bytes, over the limit of 1,000 bytes; not read")
    with pytest.raises(TopologyError, match="over the limit"):
        load_topology(file, max_bytes=1000)
    # The environment sets the default, for `keepsrc validate`, `render` and `serve` alike.
    monkeypatch.setenv(MAX_BYTES_ENV, "1000")
    assert "over the limit of 1,000 bytes" in check_topology(file)[1][0].message
    assert "over the limit of 1,000 bytes" in check_topology_text(file.read_text(), str(file))[1][0].message
    result = subprocess.run([sys.executable, "-m", "keepsrc", "validate", str(file)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode != 0
    assert f"{file}:1:1: error: {file} is 1,800 bytes, over the limit" in result.stdout + result.stderr
    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    assert "KEEPSRC_MAX_TOPOLOGY_BYTES='lots' is not a number of bytes" in check_topology(file)[1][0].message
    monkeypatch.delenv(MAX_BYTES_ENV)
    assert MAX_BYTES_DEFAULT == 64 * 1024 * 1024
    assert "syntax error" in check_topology(file)[1][0].message  # under the default limit: parsed


def test_limit_counts_utf8_bytes_not_characters() -> None:
    text = HEADER + "proxies: {}\n# " + "é" * 400 + "\n"  # 438 characters, 838 bytes
    assert check_topology_text(text, max_bytes=900)[1] == []
    assert "is 838 bytes, over the limit of 800" in check_topology_text(text, max_bytes=800)[1][0].message


def test_overlong_scalar_is_refused_unread() -> None:
    # A million-digit number would cost YAML's int constructor seconds; it is refused by its length.
    service = "  web:\n    endpoints: ['127.0.0.1:80']\n    health_check: {interval: " + "9" * 10**6 + "}\n"
    text = HEADER + "services:\n" + service + "proxies: {}\n"
    _, diagnostics = check_topology_text(text, "long.yaml")
    assert [(d.line, d.col, d.path) for d in diagnostics] == [(5, 30, "services.web.health_check.interval")]
    assert f"a value of 1,000,000 characters (at most {SCALAR_MAX:,})" in diagnostics[0].message
    assert len(str(diagnostics[0])) < 400


@pytest.mark.parametrize("file", CORPUS, ids=[f.stem for f in CORPUS])
def test_every_finding_is_one_line_starting_with_its_place(file: Path) -> None:
    for diagnostic in check_topology(file)[1]:
        text = str(diagnostic)
        assert text.splitlines() == [text]
        assert text.isprintable(), text
        match = LINE_RE.match(text)
        assert match and match["file"] == str(file), text


def test_control_characters_in_a_file_name_stay_on_one_line(tmp_path: Path) -> None:
    file = tmp_path / "odd\nname.yaml"
    file.write_text(HEADER + "proxies: 1\n")
    [diagnostic] = check_topology(file)[1]
    assert str(diagnostic).splitlines() == [str(diagnostic)]
    assert str(diagnostic).startswith(f"{tmp_path}/odd\\nname.yaml:2:10: error: proxies: ")


def test_values_at_every_bound_are_accepted_by_envoy(tmp_path: Path) -> None:
    """Each maximum keepsrc accepts, rendered statically, passes a real Envoy's validation."""
    log = tmp_path / ("a" * (255 - 4) + ".log")
    longest = "n" * NAME_MAX
    host = ".".join(["h" * 63] * 3 + ["h" * 61])  # 253 characters, labels of 63
    prefix = "/" + "p" * 4095
    text = f"""apiVersion: keepsrc/v1
services:
  {longest}:
    endpoints: ["127.0.0.1:65535"]
    connect_timeout: {DURATION_MAX_S}s
    health_check: {{interval: {DURATION_MAX_S}s, timeout: 153722867m, unhealthy_threshold: 100, healthy_threshold: 100}}
  dns:
    endpoints: ["{host}:1"]
proxies:
  p:
    listeners:
      - name: {longest}
        address: "127.0.0.1:65535"
        protocol: tcp
        service: {longest}
        stat_prefix: {longest}
        idle_timeout: {DURATION_MAX_S}s
        access_log: {log}
        accept_proxy_protocol: {{pass_through_tlvs: [255, 0]}}
        original_src: {{mark: 4294967295, table: 2147483647}}
      - name: h
        address: "127.0.0.1:65534"
        protocol: http
        routes: [{{prefix: {prefix}, service: dns}}, {{prefix: /, service: {longest}}}]
        xff: {{trusted_hops: 32}}
"""
    topology, diagnostics = check_topology_text(text)
    assert diagnostics == [] and topology is not None
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(to_dict(static_bootstrap(topology, "p", SocketAddress("127.0.0.1", 0)))))
    result = subprocess.run([envoy_path(), "--mode", "validate", "--disable-hot-restart", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]


def test_one_past_each_duration_bound_is_refused() -> None:
    text = HEADER + f"services:\n  web: {{endpoints: ['127.0.0.1:80'], connect_timeout: {DURATION_MAX_S + 1}s}}\n" \
        "proxies: {}\n"
    [diagnostic] = check_topology_text(text)[1]
    assert diagnostic.severity is Severity.ERROR
    assert f"valid: at most {DURATION_MAX_S}s" in diagnostic.message
