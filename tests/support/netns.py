"""keepsrc.demo.netns for tests: the `netlab` fixture, which needs root and `ip` (skip on a laptop,
fail under KEEPSRC_STRICT=1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keepsrc.demo.netns import Lab, NetNs, sweep_leftovers, wait_for
from tests.support.strict import require_binary, require_root

__all__ = ["Lab", "NetNs", "netlab_fixture", "wait_for"]


@pytest.fixture(name="netlab")
def netlab_fixture() -> Iterator[Lab]:
    """Pytest fixture `netlab`: import `netlab_fixture` into a test module to use it."""
    require_root()
    require_binary("ip")
    sweep_leftovers()
    with Lab() as lab:
        yield lab
