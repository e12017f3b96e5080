"""`edgecascade bench --corruptions`: every policy on every corruption of the suite, over the real pipeline.

The classification benchmark's services (`bench.stack`: broker, collector, cloud worker), the same
`DeviceAgent` and policies; the samples are the first `--samples` Fashion-MNIST test images, clean and then
corrupted by each member of `training.corruptions`' suite (synthetic corruptions of real test data). One run
per policy per corruption; the table (accuracy, offloaded, analytic device energy, when the agent's drift
monitor first flagged the run) comes from SQL (`run_summary`, `drift_timeline`). The runs' `split` names the
corruption (`test:gaussian-noise-2`), so the database says what every row was made from.

Capacity-awareness is off: a short run's slow start would shed offloads (`device_agent.capacity`), and this
table is about what each policy decides on shifted inputs, not about a loaded cloud. Flat out, no paced
runs, no HTTP peer, no idle baseline (the analytic joules need none).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy import text

from bench.run import BenchConfig, _rotate, agent_config, run_label, wait_for_rows
from bench.stack import cloud_side
from device_agent import DeviceAgent
from device_agent.config import load_profile
from device_agent.sources import load_idx_dataset
from training.corruptions import Corruption, corrupt

CLEAN = "clean"
QUICK_SAMPLES = 300
QUICK_SEVERITIES = (2,)  # one severity per kind: the middle one (the noise sigma 0.15)
SINGLES = ("edge-only", "cloud-only")  # the parts a cascade is compared with


@dataclass
class CorruptionResult:
    bench_id: str
    db: Any
    samples: int
    runs: Dict[str, Dict[str, str]] = field(default_factory=dict)  # corruption -> policy -> run_id
    described: Dict[str, str] = field(default_factory=dict)  # corruption -> its parameter in words
    rows: List[Dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False


def run_corruptions(cfg: BenchConfig, corruptions: List[Corruption], console: Console) -> CorruptionResult:
    """Run cfg.policies on the clean test images and on each corruption of them; rows from SQL."""
    started = time.monotonic()
    cfg.results.mkdir(parents=True, exist_ok=True)
    db = cfg.results / "bench.db"
    _rotate(db)
    bench_id = time.strftime("c%Y%m%d-%H%M%S")
    n = cfg.samples or (QUICK_SAMPLES if cfg.quick else 1000)
    result = CorruptionResult(bench_id, db, n)
    profile = load_profile(cfg.profile)
    images, labels = load_idx_dataset("fashion-mnist", "test", limit=n)
    targets = [int(x) for x in labels]
    console.print(
        f"[bold]edgecascade bench --corruptions[/] {bench_id}: {len(corruptions)} corruptions + clean x "
        f"{len(cfg.policies)} policies, {n} test samples each (synthetic corruptions of real test data)"
    )
    plan: List[Optional[Corruption]] = [None, *corruptions]
    with cloud_side(cfg, db, bench_id, profile.get("cloud", {}), console) as side:
        try:
            for corruption in plan:
                name = CLEAN if corruption is None else corruption.name
                result.described[name] = "" if corruption is None else corruption.describe
                data = images if corruption is None else corrupt(images, corruption)
                for policy in cfg.policies:
                    run_id = f"{bench_id}-{name}-{run_label(policy['name'])}"
                    agent_cfg = dataclasses.replace(
                        agent_config(cfg, side, profile, policy, run_id),
                        idle_seconds=0.0,
                        capacity_aware=False,
                        split=f"test:{name}",
                    )
                    console.print(f"[cyan]{escape(name)}[/] {policy['name']}: {n} samples")
                    with DeviceAgent(agent_cfg) as agent:
                        agent.run_dataset(zip(data, targets), progress=False)
                    result.runs.setdefault(name, {})[policy["name"]] = run_id
        except KeyboardInterrupt:
            result.interrupted = True
            console.print("[yellow]interrupted: keeping the runs that finished[/]")
        expected = {run_id: n for runs in result.runs.values() for run_id in runs.values()}
        wait_for_rows(db, expected, console)
        side.services.stop("collector")
    result.rows = table_rows(db, result.runs)
    result.seconds = time.monotonic() - started
    return result


def table_rows(db: Any, runs: Dict[str, Dict[str, str]]) -> List[Dict[str, Any]]:
    """One row per corruption and policy: accuracy, offloaded, analytic mJ/inf, the first drift alarm."""
    from results_db import open_database

    engine = open_database(db)
    with engine.connect() as connection:
        summary = {
            r.run_id: r
            for r in connection.execute(
                text(
                    "SELECT run_id, samples, accuracy, offload_fraction, device_j_analytic_per_inference, "
                    "cloud_j_per_inference FROM run_summary"
                )
            )
        }
        drift = {
            r.run_id: r
            for r in connection.execute(
                text(
                    "SELECT run_id, COUNT(*) AS checks, SUM(drift) AS alarms, "
                    "MIN(CASE WHEN drift = 1 THEN seq END) AS first_alarm_seq "
                    "FROM drift_timeline GROUP BY run_id"
                )
            )
        }
    engine.dispose()
    rows = []
    for corruption, by_policy in runs.items():
        accuracy = {p: summary[r].accuracy for p, r in by_policy.items() if r in summary}
        singles = [accuracy[p] for p in SINGLES if accuracy.get(p) is not None]
        best_single = max(singles) if len(singles) == len(SINGLES) else None
        for policy, run_id in by_policy.items():
            s, d = summary.get(run_id), drift.get(run_id)
            acc = None if s is None else s.accuracy
            rows.append(
                {
                    "corruption": corruption,
                    "policy": policy,
                    "run_id": run_id,
                    "samples": None if s is None else s.samples,
                    "accuracy": acc,
                    "vs_best_single": None if acc is None or best_single is None else acc - best_single,
                    "offload_fraction": None if s is None else s.offload_fraction,
                    "device_j_analytic": None if s is None else s.device_j_analytic_per_inference,
                    "cloud_j": None if s is None else s.cloud_j_per_inference,
                    "drift_checks": 0 if d is None else int(d.checks),
                    "drift_alarms": 0 if d is None else int(d.alarms or 0),
                    # the first test that flagged drift ends at this sample (seq from 0): samples seen - 1
                    "drift_first_seq": None if d is None else d.first_alarm_seq,
                }
            )
    return rows


def _pct(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.1f} pp" if signed else f"{100 * x:.1f} %"


def corruption_table(result: CorruptionResult) -> Table:
    table = Table(
        title="policies on synthetic corruptions of the Fashion-MNIST test split "
        f"({result.samples} samples each)",
        header_style="bold",
    )
    for header in ("corruption", "policy", "accuracy", "vs max(edge, cloud)", "offloaded", "analytic mJ/inf"):
        table.add_column(header, justify="left" if header in ("corruption", "policy") else "right")
    table.add_column("drift flagged at sample", justify="right")
    for r in result.rows:
        cascade = r["policy"] not in SINGLES
        mj = "–" if r["device_j_analytic"] is None else f"{1000 * r['device_j_analytic']:.3f}"
        flagged = (
            "not watched"
            if not r["drift_checks"]
            else ("–" if r["drift_first_seq"] is None else str(r["drift_first_seq"] + 1))
        )
        table.add_row(
            r["corruption"],
            r["policy"],
            _pct(r["accuracy"]),
            _pct(r["vs_best_single"], signed=True) if cascade else "",
            _pct(r["offload_fraction"]),
            mj,
            flagged,
        )
    return table


def as_json(result: CorruptionResult) -> Dict[str, Any]:
    return {
        "bench_id": result.bench_id,
        "db": str(result.db),
        "samples": result.samples,
        "label": "synthetic corruptions (training.corruptions) of the real Fashion-MNIST test split",
        "corruptions": result.described,
        "rows": result.rows,
        "seconds": result.seconds,
    }
