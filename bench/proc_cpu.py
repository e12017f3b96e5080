"""CPU seconds of processes and threads from /proc (Linux): what each part of a benchmark used."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Dict, Iterable, List

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat(path: Path) -> List[str]:
    # The command name (2nd field) may hold spaces and parentheses: split after its closing one.
    return path.read_text().rsplit(")", 1)[1].split()


def cpu_s(pid: int, reaped_children: bool = False) -> float:
    """User + system CPU of `pid` so far; with `reaped_children`, plus what its exited, waited-for children
    used (a PostgreSQL postmaster's ended backends)."""
    fields = _stat(Path(f"/proc/{pid}/stat"))
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks * _TICK_S


def tree_cpu_s(pid: int) -> float:
    """`pid` with its reaped children and its live children (one level: a postmaster and its backends)."""
    total = cpu_s(pid, reaped_children=True)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat(entry / "stat")
            if int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) * _TICK_S
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return total


def threads_cpu_s(names: Iterable[str]) -> Dict[str, float]:
    """CPU of this process's live threads of these names (Python's thread names), by name."""
    wanted = set(names)
    found: Dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.name in wanted and thread.native_id is not None:
            try:
                fields = _stat(Path(f"/proc/self/task/{thread.native_id}/stat"))
            except OSError:
                continue
            found[thread.name] = (int(fields[11]) + int(fields[12])) * _TICK_S
    return found
