"""Golden files: each topology in (examples/ and tests/golden/in/) -> rendered resources out.

Regenerate after an intended change, then review the diff:
    KEEPSRC_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keepsrc.cli import main
from keepsrc.topology import load_topology

ROOT = Path(__file__).resolve().parent.parent
INPUTS = sorted([*(ROOT / "examples").glob("*.yaml"), *(ROOT / "tests/golden/in").glob("*.yaml")])
OUT = ROOT / "tests/golden/out"
UPDATE = os.environ.get("KEEPSRC_UPDATE_GOLDEN") == "1"

CASES = [
    (source, node, static)
    for source in INPUTS
    for node in load_topology(source).proxies
    for static in (False, True)
]


def _render(capsys: pytest.CaptureFixture[str], source: Path, node: str, static: bool) -> str:
    argv = ["render", str(source.relative_to(ROOT)), "--node", node] + (["--static"] if static else [])
    cwd = Path.cwd()
    os.chdir(ROOT)  # golden files name the topology relative to the repo
    try:
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("source", "node", "static"), CASES,
    ids=[f"{s.stem}-{n}{'-static' if st else ''}" for s, n, st in CASES],
)
def test_render_matches_golden(capsys: pytest.CaptureFixture[str], source: Path, node: str, static: bool) -> None:
    golden = OUT / source.stem / f"{node}{'.static' if static else ''}.yaml"
    rendered = _render(capsys, source, node, static)
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(rendered)
    assert golden.exists(), f"no golden file {golden}; run with KEEPSRC_UPDATE_GOLDEN=1 and review it"
    assert rendered == golden.read_text(), f"{golden} differs; if intended, regenerate and review the diff"


def test_no_stale_golden_files() -> None:
    expected = {OUT / s.stem / f"{n}{'.static' if st else ''}.yaml" for s, n, st in CASES}
    stale = set(OUT.glob("*/*.yaml")) - expected
    assert not stale, f"golden files with no input: {sorted(map(str, stale))}"
