"""Skip-or-fail: on a laptop a missing binary or root skips; under KEEPSRC_STRICT=1 (CI) it fails."""

from __future__ import annotations

import os
import shutil

import pytest

STRICT = os.environ.get("KEEPSRC_STRICT") == "1"


def require(condition: object, reason: str) -> None:
    if condition:
        return
    if STRICT:
        pytest.fail(f"KEEPSRC_STRICT=1 and a requirement is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    require(path, f"'{name}' is not installed (scripts/setup installs it)")
    assert path is not None
    return path


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (network namespaces, iptables)")
