"""The benchmark's service processes (collector, cloud workers, HTTP peer), started as production starts them.

Each child runs the real `edgecascade` CLI. Readiness is taken from the child's own sd_notify `READY=1`, sent
to a datagram socket we own (the same message systemd waits for), so nothing here guesses with sleeps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from broker.launcher import terminate
from protocol.mqtt import BrokerAddress

logger = logging.getLogger(__name__)


class ServiceGroup:
    """Children that report READY=1 on our notify socket; stopped with SIGTERM (then SIGKILL) on close."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sock_path = Path(tempfile.mkdtemp(prefix="ec-notify-")) / "notify"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self._sock_path))
        self.procs: Dict[str, subprocess.Popen] = {}
        self._ready: Dict[int, bool] = {}

    def password_file(self, address: BrokerAddress) -> Path:
        path = self.workdir / f"{address.username}.pw"
        path.write_text(address.password + "\n")
        path.chmod(0o600)
        return path

    def start_collector(self, address: BrokerAddress, db: Path) -> subprocess.Popen:
        """`edgecascade collect` into `db`, as user `address.username`."""
        return self.start("collector", ["collect", *self.login(address), "--db", str(db)])

    def start_cloud(
        self,
        name: str,
        address: BrokerAddress,
        models: Path,
        worker_id: str,
        extra: Sequence[str] = (),
        prefix: Sequence[str] = (),
    ) -> subprocess.Popen:
        """`edgecascade cloud` serving `models`, with further `extra` flags."""
        args = ["cloud", *self.login(address), "--models", str(models), "--worker-id", worker_id, *extra]
        return self.start(name, args, prefix=prefix)

    def login(self, address: BrokerAddress, user_flag: str = "--user") -> List[str]:
        """The flags that log a child in as `address.username` (an agent's is `--device-id`)."""
        return [
            "--broker",
            f"{address.host}:{address.port}",
            user_flag,
            address.username,
            "--password-file",
            str(self.password_file(address)),
        ]

    def start(
        self,
        name: str,
        args: List[str],
        module: str = "edgecascade",
        timeout_s: float = 60.0,
        wait_ready: bool = True,
        prefix: Sequence[str] = (),
    ) -> subprocess.Popen:
        """Start `python -m MODULE ARGS` and wait for its READY=1 (`wait_ready=False`: many at once, e.g. a
        fleet's agents; they then get no notify socket, whose datagrams do not say who sent them). `prefix`:
        a command that execs the rest (`nice -n 19`, `CpuQuota.prefix()`), the pid staying the same."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if wait_ready:
            env["NOTIFY_SOCKET"] = str(self._sock_path)
        with open(self.workdir / f"{name}.log", "a") as log:  # the child keeps its own copy of the fd
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", module, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.procs[name] = proc
        if wait_ready:
            self._wait_ready(proc, name, timeout_s)
        return proc

    def _wait_ready(self, proc: subprocess.Popen, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._ready.get(proc.pid):
            if proc.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready:\n{tail}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{name} was not ready within {timeout_s:.0f} s")
            self._sock.settimeout(min(left, 0.5))
            try:
                data, _ = self._sock.recvfrom(4096)
            except socket.timeout:
                continue
            # Children start one at a time, so the READY=1 that arrives belongs to the one awaited.
            if b"READY=1" in data:
                self._ready[proc.pid] = True

    def wait(self, name: str, timeout_s: float) -> int:
        """Wait for a child to exit on its own; its exit status."""
        proc = self.procs.pop(name)
        return proc.wait(timeout_s)

    def signal(self, name: str, signum: int, timeout_s: float = 60.0) -> int:
        """Send `signum` and wait for the child to exit; its exit status (negative: killed by a signal)."""
        proc = self.procs.pop(name)
        proc.send_signal(signum)
        return proc.wait(timeout_s)

    def kill(self, name: str) -> int:
        """SIGKILL: no goodbye, what a crash or a power cut does."""
        return self.signal(name, signal.SIGKILL)

    def stop(self, name: str, timeout_s: float = 20.0) -> Optional[int]:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        terminate(proc, timeout_s)
        return proc.returncode

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        self._sock.close()
        self._sock_path.unlink(missing_ok=True)


@contextlib.contextmanager
def cloud_site(
    workdir: Path,
    db: Path,
    models: Path,
    workers: int = 1,
    task: str = "classify",
    cloud_cpus: Optional[float] = None,
) -> Iterator[Tuple[Any, ServiceGroup]]:
    """A broker (in this process), a collector into `db` and `workers` cloud workers of `task` (one intra-op
    thread each, as on a shared box): the cloud side every benchmark with agents needs; stopped on exit.
    `cloud_cpus`: each worker's compute held to that many CPUs (`bench.cpu_quota`)."""
    from bench.cpu_quota import CpuQuota
    from broker.launcher import BrokerProcess
    from cloud_worker.worker import COMPUTE_THREAD

    with contextlib.ExitStack() as stack:
        broker = BrokerProcess(workdir / "broker").start()
        stack.callback(broker.close)
        services = ServiceGroup(workdir / "logs")
        stack.callback(services.close)
        services.start_collector(broker.credentials("collector"), db)
        for w in range(workers):
            quota = CpuQuota(f"edgecascade-{os.getpid()}-cloud-{w}", cloud_cpus) if cloud_cpus else None
            if quota is not None:
                stack.callback(quota.close)  # after the worker has stopped (callbacks run last first)
            proc = services.start_cloud(
                f"cloud-{w}",
                broker.credentials("cloud"),
                models,
                f"w{w}",
                ["--threads", "1", "--task", task],
                prefix=quota.prefix() if quota is not None else (),  # held from its first timing on
            )
            if quota is not None:
                held = quota.keep_only(proc.pid, COMPUTE_THREAD)
                logger.info("cloud-%d: %s held to %g CPU", w, held, quota.cpus)
        yield broker, services
