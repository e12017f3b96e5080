"""The fleet simulation's CPU quota (`bench.cpu_quota`): a busy process in the group gets its share of a core
and no more, from its first instruction, and the group is gone afterwards."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench import cpu_quota
from bench.cpu_quota import CpuQuota

why_not = cpu_quota.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"no CPU quota here: {why_not}")

# Spins for 2 s of wall time, then prints the CPU seconds it got.
BUSY = (
    "import time\n"
    "end = time.monotonic() + 2.0\n"
    "while time.monotonic() < end: pass\n"
    "print(time.process_time())\n"
)


def test_a_busy_process_gets_its_quota_from_the_start_and_the_group_is_removed() -> None:
    quota = CpuQuota(f"edgecascade-test-{time.monotonic_ns()}", 0.2)
    try:
        assert quota.cpus == pytest.approx(0.2)
        out = subprocess.run(
            [*quota.prefix(), sys.executable, "-c", BUSY],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    finally:
        quota.close()
    # 2 s of spinning under 0.2 CPU: at most ~0.4 s of CPU (a free core gives 2 s; a loaded host less, never
    # more), interpreter start-up included, so the quota held from the first instruction.
    cpu_s = float(out.stdout.strip())
    assert cpu_s < 0.6, cpu_s
    assert not quota.path.exists()


def test_a_quota_below_the_kernels_floor_keeps_the_share_with_a_longer_period() -> None:
    quota = CpuQuota(f"edgecascade-test-{time.monotonic_ns()}", 0.02)
    try:
        assert quota.cpus == pytest.approx(0.02)  # 1 ms per 50 ms
    finally:
        quota.close()
    with pytest.raises(ValueError):
        CpuQuota("edgecascade-test-bad", 0)
