"""The built-in example topology as text, and the same with its http backend moved: the edit that
reload, store and replica tests make."""

from __future__ import annotations

from pathlib import Path

QUICKSTART = (Path(__file__).resolve().parent.parent.parent / "examples" / "quickstart.yaml").read_text()


def web_on(port: int) -> str:
    """The quickstart topology with its http backend on `port`."""
    return QUICKSTART.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
