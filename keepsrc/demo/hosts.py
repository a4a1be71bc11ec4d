"""Where the demo's hosts live: network namespaces on one bridge (as root), or loopback addresses.

Both give every host a `run`/`popen` and translate the examples' addresses (198.18.0.0/15 and
2001:db8::/32, as in docker-compose.yml) into the ones this network really has.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Any, Protocol

from keepsrc.demo.netns import Lab, NetNs, stop_processes

# The address plan of the examples and of docker-compose.yml: one /16, one address per host.
HOSTS: dict[str, tuple[str, ...]] = {
    "client": ("198.18.0.10", "198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14", "2001:db8::10"),
    "lb": ("198.18.1.2", "2001:db8::1:2"),
    "ingress": ("198.18.2.2", "2001:db8::2:2"),
    "svc-a": ("198.18.3.2", "2001:db8::3:2"),
    "svc-b": ("198.18.4.2", "2001:db8::4:2"),
}


class Host(Protocol):
    name: str

    def run(self, *cmd: str, check: bool = True, input: str | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]: ...

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]: ...


class Network(Protocol):
    netns: bool  # False: loopback, without original_src and IPv6

    def host(self, name: str) -> Host: ...

    def translate(self, text: str) -> str: ...

    def netns_of(self, name: str) -> str | None: ...

    def close(self) -> None: ...


class NamespaceNetwork:
    """One namespace per host, each with eth0 on a bridge (in its own namespace), IPv4 and IPv6."""

    netns = True

    def __init__(self) -> None:
        self.lab = Lab()
        try:
            switch = self.lab.ns("switch")
            switch.run("ip", "link", "add", "br0", "type", "bridge")
            switch.run("ip", "link", "set", "br0", "up")
            self.hosts: dict[str, NetNs] = {}
            for name, addresses in HOSTS.items():
                host = self.lab.ns(name)
                cidrs = [f"{a}/64" if ":" in a else f"{a}/16" for a in addresses]
                self.lab.link(host, "eth0", cidrs, switch, f"p-{name}", [])
                switch.run("ip", "link", "set", f"p-{name}", "master", "br0")
                self.hosts[name] = host
        except BaseException:
            self.lab.close()
            raise

    def host(self, name: str) -> NetNs:
        return self.hosts[name]

    def translate(self, text: str) -> str:
        return text

    def netns_of(self, name: str) -> str | None:
        return self.hosts[name].name

    def close(self) -> None:
        self.lab.close()


class _LocalHost:
    def __init__(self, network: LoopbackNetwork, name: str) -> None:
        self.network = network
        self.name = name

    def run(self, *cmd: str, check: bool = True, input: str | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc: subprocess.Popen[Any] = subprocess.Popen(list(cmd), **kwargs)
        self.network.processes.append(proc)
        return proc


class LoopbackNetwork:
    """Every host on this machine's loopback: 198.18.X.Y becomes 127.18.X.Y (all of 127/8 is lo),
    and a host's own 127.0.0.1 becomes 127.18.X.1 so hosts do not share it."""

    netns = False

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[Any]] = []

    def host(self, name: str) -> _LocalHost:
        return _LocalHost(self, name)

    def translate(self, text: str) -> str:
        return text.replace("127.0.0.1:", "127.18.4.1:").replace("198.18.", "127.18.")

    def netns_of(self, name: str) -> str | None:
        return None

    def close(self) -> None:
        stop_processes(self.processes)
