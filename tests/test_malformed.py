"""The topology validator against a corpus of broken files, as a user running `keepsrc validate` sees it.

Each tests/malformed/*.yaml file states in its header what must be reported, one line per finding:

    # expect: 12:9 proxies.ingress.listeners[0].protocol "did you mean 'tcp'"
    # expect-warning: 13:9 proxies.ingress.listeners[0].original_src "per-client"

that is line:col, the key path ('-' for none) and a fragment of the message. The findings must be
exactly these: a missing one is a check that does not exist, an extra one a duplicated or cascading
message.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from keepsrc.topology import Severity, check_topology, check_topology_text
from tests.support.strict import require

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted((ROOT / "tests" / "malformed").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "keepsrc" / "examples").glob("*.yaml"))
EXPECT_RE = re.compile(r'^# expect(?P<warning>-warning)?: (?P<line>\d+):(?P<col>\d+) (?P<path>.+?) "(?P<fragment>.*)"$')


@dataclass(frozen=True)
class Expected:
    severity: Severity
    line: int
    col: int
    path: str
    fragment: str

    def cli_prefix(self, file: Path) -> str:
        """The start of the line `keepsrc validate` prints for this finding: str(Diagnostic)."""
        path = f"{self.path}: " if self.path else ""
        return f"{file}:{self.line}:{self.col}: {self.severity}: {path}"


def expectations(file: Path) -> list[Expected]:
    found = []
    for line in file.read_text(encoding="utf-8").splitlines():
        match = EXPECT_RE.match(line)
        if match:
            severity = Severity.WARNING if match["warning"] else Severity.ERROR
            path = "" if match["path"] == "-" else match["path"]
            found.append(Expected(severity, int(match["line"]), int(match["col"]), path, match["fragment"]))
    return found


def run_validate(file: Path) -> subprocess.CompletedProcess[str]:
    require(importlib.util.find_spec("keepsrc.cli"), "keepsrc/cli.py (the `validate` command) is not written yet")
    return subprocess.run(
        [sys.executable, "-m", "keepsrc", "validate", str(file)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


def test_corpus_is_complete() -> None:
    assert len(CORPUS) >= 35
    unstated = [f.name for f in CORPUS if not expectations(f)]
    assert not unstated, f"corpus files without '# expect' lines: {unstated}"


@pytest.mark.parametrize("file", CORPUS, ids=[f.stem for f in CORPUS])
def test_check_topology_reports_exactly_the_expected(file: Path) -> None:
    expected = expectations(file)
    topology, diagnostics = check_topology(file)
    found = sorted((d.severity, d.line, d.col, d.path) for d in diagnostics)
    assert found == sorted((e.severity, e.line, e.col, e.path) for e in expected), "\n".join(map(str, diagnostics))
    for e in expected:
        at = (e.severity, e.line, e.col, e.path)
        messages = [d.message for d in diagnostics if (d.severity, d.line, d.col, d.path) == at]
        assert any(e.fragment in m for m in messages), f"{e.fragment!r} not in {messages}"
    assert all(d.file == str(file) for d in diagnostics)
    has_errors = any(e.severity is Severity.ERROR for e in expected)
    assert (topology is None) == has_errors


@pytest.mark.parametrize("file", CORPUS, ids=[f.stem for f in CORPUS])
def test_validate_command_prints_every_finding(file: Path) -> None:
    result = run_validate(file)
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    errors = [e for e in expectations(file) if e.severity is Severity.ERROR]
    assert (result.returncode != 0) == bool(errors), output
    lines = output.splitlines()
    for e in expectations(file):
        prefix = e.cli_prefix(file)
        assert any(line.startswith(prefix) and e.fragment in line for line in lines), (
            f"no line starting {prefix!r} containing {e.fragment!r} in:\n{output}"
        )


def test_warning_alone_exits_zero_and_is_printed() -> None:
    file = ROOT / "tests" / "malformed" / "warning-original-src-with-send-proxy-protocol.yaml"
    topology, diagnostics = check_topology(file)
    assert topology is not None
    assert [d.severity for d in diagnostics] == [Severity.WARNING]
    result = run_validate(file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning:" in result.stdout + result.stderr
    assert "each upstream connection pool becomes per-client" in result.stdout + result.stderr


@pytest.mark.parametrize("file", EXAMPLES, ids=[f"{f.parent.name}/{f.name}" for f in EXAMPLES])
def test_examples_validate_cleanly(file: Path) -> None:
    topology, diagnostics = check_topology(file)
    assert diagnostics == []
    assert topology is not None and topology.proxies
    result = run_validate(file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error:" not in result.stdout + result.stderr


def test_zero_byte_file(tmp_path: Path) -> None:
    file = tmp_path / "empty.yaml"
    file.write_bytes(b"")
    topology, diagnostics = check_topology(file)
    assert topology is None
    assert [str(d) for d in diagnostics] == [
        f"{file}:1:1: error: empty file; a topology starts with 'apiVersion: keepsrc/v1'"
    ]


def test_missing_file_is_a_finding_not_a_traceback(tmp_path: Path) -> None:
    file = tmp_path / "nope.yaml"
    topology, diagnostics = check_topology(file)
    assert topology is None
    assert [str(d) for d in diagnostics] == [f"{file}:1:1: error: cannot read topology file: No such file or directory"]
    result = run_validate(file)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr


def test_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    file = tmp_path / "latin1.yaml"
    file.write_bytes(b"apiVersion: keepsrc/v1\nproxies:\n  caf\xe9: {listeners: []}\n")
    _, diagnostics = check_topology(file)
    assert [(d.line, d.col) for d in diagnostics] == [(3, 6)]
    assert "not UTF-8: byte 0xe9" in diagnostics[0].message


def test_health_check_false_keeps_the_service() -> None:
    # Regression: `health_check: false` yields None, which once dropped the whole service silently.
    text = """\
apiVersion: keepsrc/v1
services:
  web: {endpoints: ["127.0.0.1:8080"], health_check: false}
proxies:
  ingress: {listeners: [{name: t, address: "0.0.0.0:1", protocol: tcp, service: web}]}
"""
    topology, diagnostics = check_topology_text(text)
    assert diagnostics == []
    assert topology is not None and topology.services["web"].health_check is None


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    file = tmp_path / "bom.yaml"
    file.write_bytes("\ufeffapiVersion: keepsrc/v1\nproxies: {}\n".encode())
    assert check_topology(file)[1] == []


def test_deep_nesting_is_a_finding_not_a_traceback(tmp_path: Path) -> None:
    # PyYAML's composer recurses per nesting level; the column where it gives up depends on the
    # stack depth, so only the line is pinned here (the corpus pins exact columns).
    file = tmp_path / "deep.yaml"
    file.write_text("apiVersion: keepsrc/v1\nproxies: {ingress: {listeners: " + "[" * 5000 + "]" * 5000 + "}}\n")
    _, diagnostics = check_topology(file)
    assert [(d.line, d.path) for d in diagnostics] == [(2, "")]
    assert "nested too deeply to read" in diagnostics[0].message
    result = run_validate(file)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
