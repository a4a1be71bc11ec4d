"""Real etcd (the Debian etcd-server package) and keepsrc replicas as processes, on loopback ports.

- `EtcdCluster`: one member or three, each a process with its own data directory, which a test
  can SIGKILL and start again on the same ports and data (an etcd restart, a lost member, the
  leader among them); optionally TLS with client certificates (`Certs`). `etcdctl` writes behind
  keepsrc's back, as an operator would.
- `Replica`: `python -m keepsrc.server --store etcd://...` as a process: SIGKILL is a crash;
  `ReplicaThread`: one in this process, whose store a test can hold back (a lagging replica).
- `push`: `keepsrc push` as a process.
Every process is killed and waited for on exit, also when a test fails.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keepsrc.demo.netns import stop_process
from keepsrc.store import open_etcd
from tests.support.envoy import free_port
from tests.support.envoy_lab import XdsServerThread
from tests.support.strict import require_binary

ROOT = Path(__file__).resolve().parent.parent.parent


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, log: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{log()}")


# -- TLS ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(directory: Path) -> Certs:
    """A CA, etcd's certificate for 127.0.0.1 and localhost, and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keepsrc test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - day)
          .not_valid_after(now + day)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def issue(name: str, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - day).not_valid_after(now + day)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                         x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = issue("etcd", server=True)
    client_cert, client_key = issue("keepsrc", server=False)
    return Certs(directory / "ca.pem", server_cert, server_key, client_cert, client_key)


# -- etcd -----------------------------------------------------------------------------------------
@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """`size` etcd members on 127.0.0.1; `certs`: clients must speak TLS with a client certificate."""

    def __init__(self, workdir: Path, size: int = 1, certs: Certs | None = None) -> None:
        self.binary = require_binary("etcd")
        self.etcdctl_binary = require_binary("etcdctl")
        self.certs = certs
        self.members = [
            Member(f"m{i}", free_port(), free_port(), workdir / f"etcd-m{i}", workdir / f"etcd-m{i}.log")
            for i in range(size)
        ]

    @property
    def scheme(self) -> str:
        return "https" if self.certs else "http"

    @property
    def hosts(self) -> str:
        return ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)

    def url(self, prefix: str = "keepsrc/test") -> str:
        return f"etcd://{self.hosts}/{prefix}"

    def tls_args(self) -> list[str]:
        """The keepsrc options that go with `certs`."""
        if self.certs is None:
            return []
        return ["--etcd-ca", str(self.certs.ca), "--etcd-cert", str(self.certs.client_cert),
                "--etcd-key", str(self.certs.client_key)]

    def start(self) -> EtcdCluster:
        for member in self.members:
            self.start_member(member)
        self.wait_healthy()
        return self

    def start_member(self, member: Member) -> None:
        """Start (or restart, with its data) one member on its ports."""
        initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)
        client_url = f"{self.scheme}://127.0.0.1:{member.client_port}"
        cmd = [
            self.binary, "--name", member.name, "--data-dir", str(member.data_dir),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", f"http://127.0.0.1:{member.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{member.peer_port}",
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", "keepsrc-test",
            # Fast elections on loopback: a killed leader is replaced in well under a second.
            "--heartbeat-interval", "50", "--election-timeout", "500",
        ]
        if self.certs is not None:
            cmd += ["--cert-file", str(self.certs.server_cert), "--key-file", str(self.certs.server_key),
                    "--client-cert-auth", "--trusted-ca-file", str(self.certs.ca)]
        with member.log_path.open("ab") as log:
            member.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, member: Member) -> None:
        """SIGKILL: no goodbye to clients or peers."""
        if member.proc is not None and member.proc.poll() is None:
            member.proc.kill()
            member.proc.wait(10)

    def leader(self) -> Member:
        for member in self.members:
            if not member.running:
                continue
            out = self.etcdctl("endpoint", "status", "--write-out", "fields",
                               endpoints=f"127.0.0.1:{member.client_port}", check=False).stdout
            fields = dict(line.split(" : ", 1) for line in out.splitlines() if " : " in line)
            if fields.get('"MemberID"') is not None and fields.get('"MemberID"') == fields.get('"Leader"'):
                return member
        raise AssertionError("no etcd member says it is the leader")

    def etcdctl(self, *args: str, endpoints: str | None = None, check: bool = True,
                stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        hosts = endpoints or ",".join(f"127.0.0.1:{m.client_port}" for m in self.members if m.running)
        cmd = [self.etcdctl_binary, "--endpoints", ",".join(f"{self.scheme}://{h}" for h in hosts.split(",")),
               "--dial-timeout", "2s", "--command-timeout", "5s"]
        if self.certs is not None:
            cmd += ["--cacert", str(self.certs.ca), "--cert", str(self.certs.client_cert),
                    "--key", str(self.certs.client_key)]
        result = subprocess.run([*cmd, *args], input=stdin.decode() if stdin else None, capture_output=True,
                                text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"})
        if check and result.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)}: exit {result.returncode}: {result.stderr}")
        return result

    def put(self, key: str, value: bytes) -> None:
        """Behind keepsrc's back: etcdctl put (the value from stdin)."""
        self.etcdctl("put", key, stdin=value)

    def healthy(self) -> bool:
        return self.etcdctl("endpoint", "health", check=False).returncode == 0

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_for(self.healthy, timeout, "etcd healthy", self.log_tail)

    def log_tail(self) -> str:
        return "\n".join(m.log_path.read_text(errors="replace")[-2000:] for m in self.members if m.log_path.exists())

    def close(self) -> None:
        for member in self.members:
            self.kill(member)


@contextlib.contextmanager
def etcd_cluster(workdir: Path, size: int = 1, certs: Certs | None = None) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(workdir, size, certs)
    try:
        yield cluster.start()
    finally:
        cluster.close()


# -- keepsrc --------------------------------------------------------------------------------------
def keepsrc(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keepsrc", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def push(path: Path, etcd: EtcdCluster, prefix: str = "keepsrc/test") -> int:
    """`keepsrc push`; the revision it printed."""
    result = keepsrc("push", str(path), "--store", etcd.url(prefix), *etcd.tls_args())
    assert result.returncode == 0, f"keepsrc push failed ({result.returncode}):\n{result.stdout}{result.stderr}"
    return int(result.stdout.rsplit("at revision ", 1)[1].split()[0])


class Replica:
    """`python -m keepsrc.server --store URL` as a process on a free loopback port."""

    def __init__(self, workdir: Path, name: str, store_url: str, extra_args: list[str] | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = workdir / f"replica-{name}.log"
        self.cmd = [sys.executable, "-m", "keepsrc.server", "--store", store_url, "--listen", self.target,
                    *(extra_args or [])]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for(lambda: self.health() is not None or not self.running, 30, f"replica {self.name} listening",
                 self.log)
        assert self.running, f"replica {self.name} exited:\n{self.log()}"
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self, service: str = "") -> str | None:
        """gRPC health: SERVING, NOT_SERVING; None when nothing answers."""
        try:
            with grpc.insecure_channel(self.target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.RpcError:
            return None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def wait_serving(self, timeout: float = 30) -> None:
        wait_for(lambda: self.health() == "SERVING", timeout, f"replica {self.name} SERVING", self.log)

    def kill(self) -> None:
        """SIGKILL: a crash; the Envoys see their connection reset."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Replica:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ReplicaThread(XdsServerThread):
    """A replica on its own event loop in this process, for a test that reaches into its store:
    `hold()` makes it lag (its store passes on no change) until `release()`."""

    def __init__(self, store_url: str) -> None:
        self.store = open_etcd(store_url)
        super().__init__(self.store, debounce_ms=200)

    def hold(self) -> None:
        self._loop.call_soon_threadsafe(self.store.hold_changes)

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self.store.release_changes)
