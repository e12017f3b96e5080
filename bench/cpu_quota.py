"""A CPU quota for a group of processes (Linux cgroups): a cloud worker held to a fraction of a core.

The fleet simulation runs devices and the cloud on one box; to measure how the fleet behaves when the cloud
is smaller than its demand, each worker gets a fixed share of a CPU, like a small cloud VM, whatever else
runs. Hand-written because it is two files to write: cgroup-tools would be a system package for that, and
systemd-run needs systemd as init (not so in containers). cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`);
`available()` says why not where neither can be written (not root, no cpu controller).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 10_000  # short: a throttled worker stalls at most a period minus its quota at a time


def _hierarchy() -> Tuple[Optional[Path], str]:
    """(the directory to create groups under, "v2"|"v1"), or (None, why not)."""
    if (ROOT / "cgroup.controllers").exists():
        if "cpu" not in (ROOT / "cgroup.subtree_control").read_text().split():
            return None, "cgroup v2 without the cpu controller enabled for child groups"
        return ROOT, "v2"
    if (ROOT / "cpu" / "cpu.cfs_quota_us").exists():
        return ROOT / "cpu", "v1"
    return None, "no cgroup cpu controller mounted at /sys/fs/cgroup"


def available() -> Optional[str]:
    """None when quotas can be set here, else why not (one line)."""
    base, kind = _hierarchy()
    if base is None:
        return kind
    if not os.access(base, os.W_OK):
        return f"cgroup {kind} at {base} is not writable (run as root)"
    return None


class CpuQuota:
    """A cgroup named `name` whose processes together get `cpus` CPUs (0.05: 5 % of one core); removed by
    `close` (its processes move back to the root group first)."""

    def __init__(self, name: str, cpus: float) -> None:
        if not cpus > 0:
            raise ValueError(f"cpus must be > 0, got {cpus}")
        why = available()
        if why is not None:
            raise RuntimeError(f"cannot set a CPU quota: {why}")
        base, self._kind = _hierarchy()
        assert base is not None
        self._base = base
        self.path = base / name
        self.path.mkdir(exist_ok=True)
        period = max(PERIOD_US, round(1000 / cpus))  # the kernel's floor on a quota is 1 ms per period
        quota = round(cpus * period)
        if self._kind == "v2":
            (self.path / "cpu.max").write_text(f"{quota} {period}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(period))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        self.cpus = quota / period

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def prefix(self) -> List[str]:
        """A command prefix that joins the group, then execs the rest: the process is held from its start
        (its first timings, too), and keeps its pid."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs")]

    def keep_only(self, pid: int, name_prefix: str) -> str:
        """Of a process held since its start (`prefix`), let every thread whose OS name does not start with
        `name_prefix` go back to the root group: a worker's compute stays held while its network thread
        reads and replies at full speed, as a cloud's NIC and kernel would. cgroup v1 moves one thread at a
        time; under v2 (threads only in a threaded subtree) the whole process stays held. Says which."""
        if self._kind != "v1":
            return "the whole process (cgroup v2: its network thread too)"
        held = threads_named(pid, name_prefix)
        if not held:
            return f"the whole process (no thread named {name_prefix}*)"
        for tid in threads_named(pid, ""):
            if tid not in held:
                with contextlib.suppress(OSError):  # ended meanwhile
                    (self._base / "tasks").write_text(str(tid))
        return f"{len(held)} compute thread(s), from the start"

    def throttled_s(self) -> float:
        """How long the group's processes were held back by the quota so far."""
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "throttled_time":  # v1: nanoseconds
                return int(value) / 1e9
            if key == "throttled_usec":  # v2
                return int(value) / 1e6
        return 0.0

    def close(self) -> None:
        if not self.path.exists():
            return
        pids: List[str] = (self.path / "cgroup.procs").read_text().split()
        for pid in pids:
            with contextlib.suppress(OSError):  # gone meanwhile
                (self._base / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):  # a process still exiting: harmless, empty soon
            self.path.rmdir()


def threads_named(pid: int, name_prefix: str) -> List[int]:
    """Thread ids of `pid` whose OS name (/proc/PID/task/TID/comm) starts with `name_prefix`."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            if (task / "comm").read_text().startswith(name_prefix):
                out.append(int(task.name))
    return sorted(out)
