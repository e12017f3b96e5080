"""A labelled estimate for when no counter can be read: this process's CPU time x watts per busy core.

It is not a measurement and is never stored as one: its source is always ``estimate``. It only sees this
process's CPU time (all its threads, user + system), so it leaves out idle power, other processes, memory and
accelerators; an idle baseline over it is therefore near zero. The watts per core come from, in order:

1. the configured ``estimate_watts_per_core`` (device profiles set it);
2. a configured ``estimate_tdp_w`` divided by the number of CPUs;
3. the small table below, by CPU core (Arm cores by their `CPU part` id in /proc/cpuinfo);
4. otherwise `DEFAULT_WATTS_PER_CORE`, logged as a guess.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

from metering.common import CounterMeter

logger = logging.getLogger(__name__)

DEFAULT_WATTS_PER_CORE = 10.0
# Arm `CPU part` -> (core, watts per busy core): rough figures from the boards' CPU rails at full load.
ARM_CORE_WATTS: Dict[str, Tuple[str, float]] = {
    "0xd07": ("Cortex-A57 (Jetson Nano, TX1)", 1.2),
    "0xd08": ("Cortex-A72 (Raspberry Pi 4)", 1.0),
    "0xd0b": ("Cortex-A76 (Raspberry Pi 5)", 1.5),
    "0xd42": ("Cortex-A78AE (Jetson Orin)", 1.5),
    "0x004": ("Carmel (Jetson Xavier)", 2.0),
}


def _cpu_part(cpuinfo_path: str) -> Optional[str]:
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "CPU part":
                    return value.strip().lower()
    except OSError:
        return None
    return None


def watts_per_core(
    options: Dict[str, Any], cpuinfo_path: str = "/proc/cpuinfo", cpu_count: Optional[int] = None
) -> Tuple[float, str]:
    """(watts per busy core, where that figure came from)."""
    if options.get("estimate_watts_per_core") is not None:
        return float(options["estimate_watts_per_core"]), "configured estimate_watts_per_core"
    if options.get("estimate_tdp_w") is not None:
        cores = cpu_count or os.cpu_count() or 1
        return float(options["estimate_tdp_w"]) / cores, f"configured estimate_tdp_w / {cores} CPUs"
    part = _cpu_part(cpuinfo_path)
    if part in ARM_CORE_WATTS:
        core, watts = ARM_CORE_WATTS[part]
        return watts, f"table: {core}"
    logger.warning(
        "estimate meter: no estimate_watts_per_core configured, no table entry for this CPU; guessing %.1f W",
        DEFAULT_WATTS_PER_CORE,
    )
    return DEFAULT_WATTS_PER_CORE, "default guess"


class EstimateMeter(CounterMeter):
    """Joules = process CPU seconds x watts per core. Always labelled ``estimate``."""

    source = "estimate"

    def __init__(
        self,
        *,
        watts_per_core: float,
        basis: str = "",
        cpu_time: Callable[[], float] = time.process_time,
        **kwargs: Any,
    ) -> None:
        if watts_per_core <= 0:
            raise ValueError(f"watts per core must be > 0, got {watts_per_core}")
        super().__init__(
            rails=["cpu_process"], detail={"watts_per_core": watts_per_core, "basis": basis}, **kwargs
        )
        self.watts_per_core = watts_per_core
        self._cpu_time = cpu_time
        self._origin_s = cpu_time()

    def _read_joules(self) -> Dict[str, float]:
        return {"cpu_process": (self._cpu_time() - self._origin_s) * self.watts_per_core}


def open_estimate(options: Dict[str, Any], **kwargs: Any) -> EstimateMeter:
    """Factory for `open_meter`: options `estimate_watts_per_core`, `estimate_tdp_w`."""
    watts, basis = watts_per_core(options)
    return EstimateMeter(watts_per_core=watts, basis=basis, **kwargs)
