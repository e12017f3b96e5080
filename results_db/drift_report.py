"""The report's drift section: per device and run, the tests, the alarms and the first one, from SQL
(`drift_timeline`, migration 0006), and a figure of each run's evidence against its test level over time.

Evidence is -log10 of the smallest p-value of a test: above the dashed line (-log10 of the per-test level)
the device flagged drift. Only read here; the devices computed everything (`device_agent.drift`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from sqlalchemy import Engine, text

FIGURE = "drift.png"
P_FLOOR = 1e-300  # a p-value of 0 (the series underflows) drawn at the top rather than at infinity


def drift_rows(engine: Engine, run_id: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per (device, run) that tested for drift."""
    where = "WHERE run_id = :run_id" if run_id else ""
    sql = f"""
        SELECT device_id, run_id, policy, COUNT(*) AS checks, SUM(drift) AS alarms,
               SUM(onset) AS onsets, MIN(CASE WHEN drift = 1 THEN seq END) AS first_alarm_seq,
               MIN(CASE WHEN drift = 1 THEN ts_unix END) AS first_alarm_unix, MAX(seq) AS last_seq,
               MIN(p_value) AS min_p_value, MAX(level) AS level
        FROM drift_timeline {where}
        GROUP BY device_id, run_id, policy ORDER BY device_id, run_id"""
    with engine.connect() as connection:
        return [dict(r._mapping) for r in connection.execute(text(sql), {"run_id": run_id} if run_id else {})]


def plot_drift(
    engine: Engine, path: Path, run_id: Optional[str] = None
) -> Dict[str, List[Tuple[int, float]]]:
    """The figure; returns what it plotted: per `device / run`, (seq, -log10 p) of each test."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    where = "WHERE run_id = :run_id" if run_id else ""
    series: Dict[str, List[Tuple[int, float]]] = {}
    levels = []
    with engine.connect() as connection:
        for r in connection.execute(
            text(f"SELECT device_id, run_id, seq, p_value, level FROM drift_timeline {where} ORDER BY seq"),
            {"run_id": run_id} if run_id else {},
        ):
            key = f"{r.device_id} / {r.run_id}"
            series.setdefault(key, []).append((int(r.seq), -math.log10(max(float(r.p_value), P_FLOOR))))
            levels.append(float(r.level))
    figure = Figure(figsize=(7.0, 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, points in sorted(series.items())[:12]:  # a fleet's worth would be unreadable: the table has all
        axes.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=1, label=key)
    if levels:
        axes.axhline(-math.log10(min(levels)), color="grey", linestyle="--", label="test level (drift above)")
    axes.set_xlabel("sample (seq) at the end of the tested window")
    axes.set_ylabel("evidence of drift, -log10 p")
    axes.set_yscale("symlog", linthresh=10)
    axes.legend(fontsize="small")
    figure.savefig(path)
    return series


def drift_markdown(engine: Engine, out_dir: Path, run_id: Optional[str] = None) -> str:
    """The section (empty when no device tested for drift); writes `drift.png` into `out_dir`."""
    rows = drift_rows(engine, run_id)
    if not rows:
        return ""
    plot_drift(engine, out_dir / FIGURE, run_id)
    lines = [
        "## Drift",
        "",
        f"![drift per device over time]({FIGURE})",
        "",
        "*Each device's drift tests: the main block's outputs over its last samples against the model card's "
        "profile (KS per output, Bonferroni); above the dashed line the test found drift.*",
        "",
        "| device | run | policy | tests | alarms | drift episodes | first alarm at sample | min p |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        first = "–" if r["first_alarm_seq"] is None else str(r["first_alarm_seq"])
        lines.append(
            f"| {r['device_id']} | {r['run_id']} | {r['policy'] or '–'} | {r['checks']} | {r['alarms']} | "
            f"{r['onsets']} | {first} | {r['min_p_value']:.2g} |"
        )
    return "\n".join(lines) + "\n"
