"""`keepsrc serve --workers N`: N server processes sharing the listening port, under a supervisor.

grpc.aio serves every stream of a process on one event loop, so one process uses one core
however many the host has. Each worker is a whole keepsrc server, a replica of the others on one
host: it reads the same store (file or etcd) and builds the same snapshots, and content-hash
versions make every worker send an Envoy identical bytes, so an Envoy that moves from one worker
to another (a worker restarted, a connection aged out) reconnects holding exactly what the new
worker serves, and is sent nothing. The kernel spreads new connections over the workers
(SO_REUSEPORT); only the workers of one supervisor share the port: the supervisor first binds
it without SO_REUSEPORT, which fails if anything holds it, reuse or not.

The supervisor serves nothing itself but /metrics: the workers write their metrics to files in
the run directory (prometheus_client's multiprocess mode) and the supervisor's page sums them.
Each worker also serves on a unix socket in the run directory, where the others ask it for its
Envoys' status, so CSDS (and `keepsrc status`) on the public port shows every node whichever
worker it reached. A worker that exits is started again; its Envoys reconnect to the port.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("keepsrc.server")

PR_SET_PDEATHSIG = 1
# A worker that keeps dying is started again after a pause that doubles up to this.
MAX_RESTART_DELAY_S = 10.0
# A worker that served this long before exiting was not crash-looping: its next restart is immediate.
STABLE_AFTER_S = 30.0
# Exit codes of a worker that cannot start (cannot bind, invalid topology file): restarting it
# would fail the same way, so the supervisor stops.
CONFIGURATION_ERRORS = (1, 2)


def default_workers(listen: str) -> int:
    """One per core; one on a unix socket, which cannot be shared."""
    return 1 if listen.startswith("unix:") else os.cpu_count() or 1


@dataclass(frozen=True)
class Worker:
    """Where a worker process stands among its supervisor's workers (`--worker DIR:INDEX:COUNT:STARTS`)."""

    run_dir: Path
    index: int
    count: int
    starts: int  # how many times this worker was started before; 0 the first time
    # The supervisor's pid, read when the worker parses its spec (the supervisor is then its
    # parent). Compared with getppid(), not with 1: in a container the supervisor may be pid 1, and
    # an orphan may go to a subreaper.
    supervisor: int = field(default_factory=os.getppid, compare=False)

    @classmethod
    def parse(cls, spec: str) -> Worker:
        run_dir, index, count, starts = spec.rsplit(":", 3)
        return cls(Path(run_dir), int(index), int(count), int(starts))

    def spec(self) -> str:
        return f"{self.run_dir}:{self.index}:{self.count}:{self.starts}"

    def arguments(self, args: argparse.Namespace) -> argparse.Namespace:
        """The supervisor's `serve` arguments, which a worker runs with (its own command line only
        says which worker it is): every option passes through as parsed, so one added to `serve`
        later needs nothing here."""
        saved = pickle.loads(arguments_path(self.run_dir).read_bytes())
        return argparse.Namespace(**{**saved, "parser": args.parser, "workers": 1, "worker": self, "metrics": None})

    @property
    def socket(self) -> str:
        return f"unix:{socket_path(self.run_dir, self.index)}"

    def mark_started(self) -> None:
        """Tell the supervisor this worker got as far as serving: an exit from now on is a crash
        to recover from, not a configuration that cannot start."""
        (self.run_dir / f"worker-{self.index}.started").touch()

    @property
    def peers(self) -> tuple[str, ...]:
        """The other workers' private sockets."""
        return tuple(f"unix:{socket_path(self.run_dir, i)}" for i in range(self.count) if i != self.index)

    def die_with_supervisor(self) -> None:
        """SIGTERM this process when the supervisor goes, even by SIGKILL: no worker outlives it
        holding the port."""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != self.supervisor:  # the supervisor went before prctl
            os.kill(os.getpid(), signal.SIGTERM)


    def leave(self) -> None:
        """On exit: a worker orphaned by a supervisor that was SIGKILLed removes the run directory,
        which the supervisor would have removed (the last of the workers to go wins; the others
        find it gone)."""
        if os.getppid() != self.supervisor:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def arguments_path(run_dir: Path) -> Path:
    return run_dir / "serve-arguments.pickle"


def socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.sock"


def metrics_dir(run_dir: Path) -> Path:
    return run_dir / "metrics"


def claim_port(listen: str) -> str:
    """`listen` with its port resolved (port 0: a free one), or OSError if something holds it.

    Bound without SO_REUSEPORT, a socket fails on a port any other socket holds, reuse or not:
    so a second server, or a second supervisor's workers, cannot end up sharing the port with
    these workers and taking some of their Envoys. The socket is closed at once; the workers
    bind the port next, with SO_REUSEPORT."""
    host, _, port = listen.rpartition(":")
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As gRPC does: connections of an earlier server still in TIME_WAIT do not hold the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bare, int(port)))
        except OSError as exc:
            raise OSError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
        return f"{host}:{probe.getsockname()[1]}"


class Supervisor:
    def __init__(self, args: argparse.Namespace, count: int) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="keepsrc-workers-"))
        metrics_dir(self.run_dir).mkdir()
        # The parser holds lambdas (argument types) and is not picklable; each worker has its own.
        saved = {k: v for k, v in vars(args).items() if k not in ("parser", "run")}
        arguments_path(self.run_dir).write_bytes(pickle.dumps(saved))
        self.count = count
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir(self.run_dir))}
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False

    async def spawn(self, index: int, starts: int) -> asyncio.subprocess.Process:
        worker = Worker(self.run_dir, index, self.count, starts)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "keepsrc.server", "--worker", worker.spec(), env=self.env)
        self.procs[index] = proc
        return proc

    def signal_all(self, signum: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signum)

    async def keep(self, index: int) -> int | None:
        """Run worker `index` until the supervisor stops, starting it again whenever it exits; the
        exit code if it could not start at all (then every worker stops)."""
        from keepsrc.server import metrics

        starts, delay = 0, 0.0
        while True:
            proc = await self.spawn(index, starts)
            began = time.monotonic()
            code = await proc.wait()
            metrics.mark_process_dead(proc.pid, metrics_dir(self.run_dir))
            if self.stopping:
                return None
            started = self.run_dir / f"worker-{index}.started"
            if starts == 0 and code in CONFIGURATION_ERRORS and not started.exists():
                log.error("worker %d could not start (exit code %d); stopping", index, code)
                return code
            stable = time.monotonic() - began > STABLE_AFTER_S
            delay = 0.0 if stable or starts == 0 else min(MAX_RESTART_DELAY_S, max(0.5, 2 * delay))
            reason = f"signal {-code}" if code < 0 else f"exit code {code}"
            log.warning("worker %d (pid %d) ended with %s; starting it again%s", index, proc.pid, reason,
                        f" in {delay:.1f} s" if delay else "")
            await asyncio.sleep(delay)
            starts += 1

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        # SIGHUP reloads: each worker reads the store again (all end up on the same content).
        loop.add_signal_handler(signal.SIGHUP, self.signal_all, signal.SIGHUP)
        keepers = [asyncio.create_task(self.keep(i)) for i in range(self.count)]
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([stopped, *keepers], return_when=asyncio.FIRST_COMPLETED)
        self.stopping = True
        failed = [k.result() for k in keepers if k.done() and k.result() is not None]
        self.signal_all(signal.SIGTERM)
        stopped.cancel()
        await asyncio.gather(*keepers, stopped, return_exceptions=True)
        return failed[0] if failed else 0

    def close(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)


def supervise(args: argparse.Namespace, count: int) -> int:
    """Run `count` workers serving `args` (of `serve`) until SIGTERM; the exit code."""
    from keepsrc.server import metrics

    if args.listen.startswith("unix:"):
        log.error("a unix socket cannot be shared by workers: use --workers 1 with --listen %s", args.listen)
        return 1
    try:
        # Port 0: every worker listens on the port chosen here.
        args.listen = claim_port(args.listen)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    supervisor = Supervisor(args, count)
    try:
        if args.metrics:
            try:
                metrics.serve_metrics(args.metrics, metrics_dir(supervisor.run_dir))
            except (OSError, ValueError) as exc:
                log.error("cannot serve metrics on %s: %s", args.metrics, exc)
                return 1
            log.info("metrics on http://%s/metrics", args.metrics)
        log.info("%d workers on %s (run directory %s)", count, args.listen, supervisor.run_dir)
        return asyncio.run(supervisor.run())
    finally:
        supervisor.close()
