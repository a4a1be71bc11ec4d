"""Network namespaces for the demo and end-to-end tests: hosts joined by veth pairs, always cleaned up.

A `Lab` owns a set of namespaces named `ks-<pid>-<name>`; the pid is the test process, so a
later run can tell leftovers of a crashed run (pid gone) from a run still in progress, and
`sweep_leftovers()` deletes only the former. Veth pairs are created directly inside their two
namespaces (`ip link add ... netns A type veth peer ... netns B`), so no interface ever exists
in the root namespace and names like eth0 cannot collide with the host's.

Addresses come from 198.18.0.0/15 (RFC 2544 benchmarking) and 2001:db8::/32 (documentation):
nothing here can route to a real network even by mistake.

    with lab() as net:     # or the pytest fixture `netlab` (import netlab_fixture)
        client, proxy = net.ns("client"), net.ns("proxy")
        net.link(client, "eth0", "198.18.1.1/24", proxy, "eth0", "198.18.1.2/24")
        client.run("ip", "route", "add", "default", "via", "198.18.1.2")
        server = proxy.popen(["python3", "-m", "http.server"])   # killed when the lab closes

Envoy runs inside a namespace through tests/support/envoy.py: `Envoy(config, dir, netns=ns.name)`;
its admin API listens inside that namespace, so query it from there (`ns.run(...)`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

PREFIX = "ks-"
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)-")
COMMAND_TIMEOUT = 30.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=check)


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A killed test run stays a zombie until its parent reaps it: dead all the same.
    return stat.rpartition(")")[2].split()[0] != "Z"


def _kill_namespace_pids(name: str) -> None:
    """Kill what still runs in a namespace: deleting its name alone would keep it alive."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _delete_namespace(name: str) -> None:
    _kill_namespace_pids(name)
    _ip("netns", "delete", name, check=False)


def list_namespaces() -> list[str]:
    # `ip netns list` prints "name (id: N)" once a namespace has a peer id; keep the name only.
    return [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]


def sweep_leftovers() -> list[str]:
    """Delete namespaces left by earlier runs that died (their creating pid no longer exists)."""
    swept = []
    for name in list_namespaces():
        match = _NAME_RE.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            _delete_namespace(name)
            swept.append(name)
    return swept


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5) -> int:
    """SIGTERM, and SIGKILL if it has not exited within `timeout` seconds; its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout)


def stop_processes(processes: list[subprocess.Popen[Any]]) -> None:
    """Terminate (then kill) each process still running, newest first, and forget them all."""
    for proc in reversed(processes):
        stop_process(proc)
    processes.clear()


class NetNs:
    """One named network namespace; commands run in it through `ip netns exec`."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, *cmd: str, check: bool = True, input: str | None = None,
            timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run to completion; on failure the error names the namespace, command and stderr."""
        result = subprocess.run([*self.prefix(), *cmd], capture_output=True, text=True,
                                input=input, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"[{self.name}] {' '.join(cmd)} exited {result.returncode}:\n"
                               f"{result.stdout}{result.stderr}")
        return result

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running process in the namespace; the Lab kills it on exit."""
        proc: subprocess.Popen[Any] = subprocess.Popen([*self.prefix(), *cmd], **kwargs)
        self.lab.processes.append(proc)
        return proc

    def __str__(self) -> str:
        return self.name


class Lab:
    """Namespaces, links and processes for one test; `close()` (or leaving the `with`) removes them all."""

    def __init__(self) -> None:
        self.run_prefix = f"{PREFIX}{os.getpid()}-"
        self.namespaces: list[NetNs] = []
        self.processes: list[subprocess.Popen[Any]] = []

    def ns(self, name: str) -> NetNs:
        """A fresh namespace with `lo` up (Envoy's admin and local upstreams need loopback)."""
        full = f"{self.run_prefix}{name}"
        if any(n.name == full for n in self.namespaces):
            raise ValueError(f"namespace {name!r} already exists in this lab")
        # A namespace of this exact name can only be left over from this same pid (e.g. a test
        # interrupted mid-setup in the same session); it is stale, so replace it.
        if full in list_namespaces():
            _delete_namespace(full)
        _ip("netns", "add", full)
        netns = NetNs(self, full)
        self.namespaces.append(netns)
        netns.run("ip", "link", "set", "lo", "up")
        return netns

    def link(self, a: NetNs, a_if: str, a_addrs: str | Sequence[str],
             b: NetNs, b_if: str, b_addrs: str | Sequence[str]) -> None:
        """A veth pair a:a_if <-> b:b_if, both up, with the given CIDR addresses (v4 and/or v6)."""
        _ip("link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if, "netns", b.name)
        for netns, ifname, addrs in ((a, a_if, a_addrs), (b, b_if, b_addrs)):
            for cidr in [addrs] if isinstance(addrs, str) else addrs:
                # nodad: IPv6 duplicate address detection would keep the address unusable for ~2s.
                extra = ["nodad"] if ":" in cidr else []
                netns.run("ip", "addr", "add", cidr, "dev", ifname, *extra)
            netns.run("ip", "link", "set", ifname, "up")

    def close(self) -> None:
        stop_processes(self.processes)
        # Deleting a namespace destroys the veth ends inside it, and with them their peers.
        for netns in reversed(self.namespaces):
            _delete_namespace(netns.name)
        self.namespaces.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll until predicate() is true; a bounded wait, never an assertion about time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
