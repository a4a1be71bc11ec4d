"""keepsrc.demo.envoy for tests: a missing Envoy skips on a laptop and fails under KEEPSRC_STRICT=1."""

from __future__ import annotations

from keepsrc.demo import envoy as _envoy
from keepsrc.demo.envoy import Envoy, free_port
from tests.support.strict import require

__all__ = ["Envoy", "envoy_path", "free_port"]


def envoy_path() -> str:
    try:
        return _envoy.envoy_path()
    except _envoy.EnvoyMissing as exc:
        require(False, str(exc))
        raise
