"""`keepsrc serve` as a process, as an operator runs it, and a wait that tolerates a server not up yet."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc

from keepsrc.demo.netns import stop_process
from tests.support.envoy import free_port

ROOT = Path(__file__).resolve().parent.parent.parent


def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `predicate` until it is true; a predicate that cannot ask yet (connection refused, a
    missing key, an RPC error) counts as not yet. A bounded wait, never an assertion about time."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, ValueError, KeyError, grpc.RpcError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what} ({last})")


class Serve:
    """`keepsrc serve ARGS` with metrics on a free port, and --listen on another unless ARGS name one."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log = workdir / f"serve-{self.port}.log"
        listen = () if any(a.startswith("--listen") for a in args) else ("--listen", f"127.0.0.1:{self.port}")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keepsrc", "serve", *args, "--metrics", f"127.0.0.1:{self.metrics_port}", *listen],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=3) as response:
            return str(response.read().decode())

    def metric(self, name: str) -> float:
        for line in self.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def stop(self) -> int:
        return stop_process(self.proc, 15)
