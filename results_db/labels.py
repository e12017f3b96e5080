"""Two labels the report puts on a run: what its energy figure stands on, and how its samples were fed.

Energy. A run whose `energy_source` is a real meter (RAPL, jtop, tegrastats, INA3221, NVML) has measured
joules. Any other source means no meter was read: `estimate` is process CPU time x an assumed watts per
core, `analytic` and `none` have no measurement at all, and `mixed` (a run whose rows name several sources)
cannot be put on one measured axis. Figures that compare runs then use the analytic column (the model
card's MACs and bytes x Horowitz's per-operation energies), which is hardware-independent and defined for
every run, and say so.

Pace. A paced run (samples at a camera's rate) measures service latency; a flat-out run's latency is mostly
the queue in front of a saturated worker. The two are never one latency curve.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

# metering.common.SOURCES less `estimate` (results_db does not import metering; a test keeps the two in step)
METERED_SOURCES = ("rapl", "jtop", "tegrastats", "ina3221", "nvml")
METERED = "metered"
ANALYTIC = "analytic"


def energy_basis(source: Optional[str]) -> str:
    """`metered` for a run whose joules a meter measured, else `analytic`."""
    return METERED if source in METERED_SOURCES else ANALYTIC


def plotted_j_per_inference(run: Mapping[str, Any]) -> Optional[float]:
    """The J/inference a figure shows for a `run_summary` row: gross when metered, else the analytic one."""
    if energy_basis(run.get("energy_source")) == METERED:
        return run.get("device_j_gross_per_inference")
    return run.get("device_j_analytic_per_inference")


FLAT_OUT = "flat out"
# `edgecascade bench` names the latency runs it paces `<run>-paced` (bench/run.py); an agent's run record does
# not carry the rate it was fed at, a run record whose policy_params carry `rate_hz` (the HTTP peer) does.
PACED_SUFFIX = "-paced"


def run_pace(run_id: str, policy_params: Any) -> str:
    """How a run's samples were fed: `paced <rate> Hz`, `paced` (rate not recorded) or `flat out`.

    `flat out` means no pace was recorded: a run fed at `edgecascade agent --rate` without either mark
    cannot be told apart here."""
    if isinstance(policy_params, str):  # JSON text on SQLite, a dict from PostgreSQL's JSONB
        policy_params = json.loads(policy_params)
    rate = policy_params.get("rate_hz") if isinstance(policy_params, dict) else None
    if rate:
        return f"paced {float(rate):g} Hz"
    return "paced" if run_id.endswith(PACED_SUFFIX) else FLAT_OUT
