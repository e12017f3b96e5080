"""`open_meter(preference, options)`: the first backend of an ordered list that works here.

Why each earlier backend was skipped is logged once per process (a service that reopens its meter does not
repeat itself). `estimate` may only come last: it is used only when no counter can be read.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from metering.common import Meter, MeterPermissionError, MeterUnavailable

logger = logging.getLogger(__name__)

# name -> (module, factory); modules are imported only when tried, so optional libraries stay optional
BACKENDS: Dict[str, Tuple[str, str]] = {
    "rapl": ("metering.rapl", "open_rapl"),
    "jtop": ("metering.jtop", "open_jtop"),
    "tegrastats": ("metering.tegrastats", "open_tegrastats"),
    "ina3221": ("metering.ina3221", "open_ina3221"),
    "nvml": ("metering.nvml", "open_nvml"),
    "estimate": ("metering.estimate", "open_estimate"),
}
OPTIONS = {
    "rapl_root",
    "rapl_max_power_w",
    "jtop_socket",
    "jtop_interval_s",
    "tegrastats_path",
    "tegrastats_interval_ms",
    "ina3221_root",
    "ina3221_interval_s",
    "jetson_total_rails",
    "nvml_devices",
    "estimate_watts_per_core",
    "estimate_tdp_w",
}
# keys of a profile's [metering] table that are not backend options; accepted so the table can be passed whole
PROFILE_KEYS = {"backends", "idle_seconds"}

_logged: Set[Tuple[str, str]] = set()
_logged_lock = threading.Lock()


def _log_once(level: int, name: str, message: str) -> None:
    with _logged_lock:
        if (name, message) in _logged:
            return
        _logged.add((name, message))
    logger.log(level, "meter %s: %s", name, message)


def check_options(preference: Sequence[str], options: Dict[str, Any]) -> None:
    """Refuse unknown backends, unknown options and an `estimate` that is not last."""
    if isinstance(preference, str):
        raise ValueError("preference must be a list of backend names, not a string")
    if not preference:
        raise ValueError("preference list is empty")
    unknown = [n for n in preference if n not in BACKENDS]
    if unknown:
        hint = (
            " (analytic is not a meter: use metering.AnalyticModel beside one)"
            if "analytic" in unknown
            else ""
        )
        raise ValueError(f"unknown meter backends {unknown}; known: {sorted(BACKENDS)}{hint}")
    if "estimate" in preference and preference[-1] != "estimate":
        raise ValueError("'estimate' must be the last backend: it is used only when no counter can be read")
    bad = sorted(set(options) - OPTIONS - PROFILE_KEYS)
    if bad:
        raise ValueError(f"unknown metering options {bad}; known: {sorted(OPTIONS)}")


def open_meter(preference: Sequence[str], options: Optional[Dict[str, Any]] = None, **kwargs: Any) -> Meter:
    """Open the first backend in `preference` that works; raise MeterUnavailable naming every reason if none.

    `kwargs` (clock, wall_clock, sleep) go to the meter, for tests.
    """
    opts = dict(options or {})
    check_options(preference, opts)
    reasons: List[str] = []
    for name in preference:
        module_name, factory_name = BACKENDS[name]
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
            meter: Meter = factory(opts, **kwargs)
        except MeterUnavailable as err:  # includes MeterPermissionError
            reasons.append(f"{name}: {err}")
            # a counter that exists but may not be read is worth a warning: someone can fix it
            level = logging.WARNING if isinstance(err, MeterPermissionError) else logging.INFO
            _log_once(level, name, f"skipped: {err}")
            continue
        if name == "estimate":
            _log_once(
                logging.WARNING, name, "no energy counter could be read: figures are estimates, labelled so"
            )
        logger.info("energy meter: %r %s", meter, meter.detail)
        return meter
    raise MeterUnavailable("no meter works here:\n  " + "\n  ".join(reasons))
