"""`edgecascade report`: a terminal summary (rich), three PNG figures and a Markdown report from the database.

All numbers come from the SQL views (`run_summary`, `pareto_points`, `class_accuracy`, `inference_facts`),
so the report and a user's own queries always agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, text

from results_db import plots

FIGURES = {
    "accuracy_energy": "accuracy_energy.png",
    "exit_mix": "exit_mix.png",
    "latency_cdf": "latency_cdf.png",
}
UNKNOWN_POLICY = "(unknown)"  # runs whose `run` record has not arrived


@dataclass
class ReportData:
    """What the report shows, read from the database once."""

    runs: List[Dict[str, Any]]  # run_summary rows (one run with --run)
    pareto: List[Dict[str, Any]]  # pareto_points rows: all runs, so one run is seen among the others
    exit_mix: Dict[str, Dict[str, float]]  # policy -> exit stage -> fraction of samples
    latency_cdf: Dict[str, Tuple[List[float], List[float]]]  # policy -> (latency ms, fraction <= it)
    class_accuracy: Dict[str, Dict[int, float]]  # policy -> label -> accuracy
    run_id: Optional[str] = None


@dataclass
class ReportResult:
    data: ReportData
    files: Dict[str, Path] = field(default_factory=dict)
    series: Dict[str, Any] = field(default_factory=dict)  # what each figure plotted


def _rows(engine: Engine, sql: str, **params: Any) -> List[Dict[str, Any]]:
    with engine.connect() as connection:
        result = connection.execute(text(sql), params)
        return [dict(row._mapping) for row in result]


def _policy(value: Any) -> str:
    return UNKNOWN_POLICY if value is None else str(value)


def ecdf(values: List[float], points: int) -> Tuple[List[float], List[float]]:
    """Empirical CDF of sorted `values`, thinned to about `points` steps (nearest rank, always the last)."""
    n = len(values)
    if n == 0:
        return [], []
    step = max(1, n // points)
    ranks = list(range(step, n + 1, step))
    if ranks[-1] != n:
        ranks.append(n)
    return [values[r - 1] for r in ranks], [r / n for r in ranks]


def load_report_data(engine: Engine, run_id: Optional[str] = None, cdf_points: int = 400) -> ReportData:
    """Read the report's numbers; with `run_id`, the tables and mixes are that run's only."""
    where = "WHERE run_id = :run_id" if run_id else ""
    params = {"run_id": run_id} if run_id else {}
    runs = _rows(engine, f"SELECT * FROM run_summary {where} ORDER BY policy, run_id", **params)
    if run_id and not runs:
        raise LookupError(f"no run {run_id!r} in the database")
    pareto = _rows(engine, "SELECT * FROM pareto_points ORDER BY device_j_gross_per_inference, run_id")

    mix: Dict[str, Dict[str, float]] = {}
    totals: Dict[str, int] = {}
    for row in _rows(
        engine,
        f"SELECT policy, exit_stage, COUNT(*) AS n FROM inference_facts {where} GROUP BY policy, exit_stage",
        **params,
    ):
        policy = _policy(row["policy"])
        mix.setdefault(policy, {})[row["exit_stage"]] = row["n"]
        totals[policy] = totals.get(policy, 0) + row["n"]
    exit_mix = {p: {s: n / totals[p] for s, n in stages.items()} for p, stages in mix.items()}

    latencies: Dict[str, List[float]] = {}
    for row in _rows(
        engine, f"SELECT policy, latency_ms FROM inference_facts {where} ORDER BY latency_ms", **params
    ):
        latencies.setdefault(_policy(row["policy"]), []).append(row["latency_ms"])
    cdfs = {p: ecdf(values, cdf_points) for p, values in latencies.items()}

    per_class: Dict[str, Dict[int, float]] = {}
    for row in _rows(
        engine,
        f"SELECT policy, label, SUM(correct) AS correct, SUM(samples) AS samples FROM class_accuracy {where} "
        "GROUP BY policy, label ORDER BY label",
        **params,
    ):
        per_class.setdefault(_policy(row["policy"]), {})[int(row["label"])] = row["correct"] / row["samples"]
    return ReportData(runs, pareto, exit_mix, cdfs, per_class, run_id)


# -- formatting ----------------------------------------------------------------------------------------
def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{value * 100:.2f}"


def _mj(value: Optional[float]) -> str:
    return "–" if value is None else f"{value * 1e3:.3f}"


def _ms(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def _num(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.0f}"


# (header, run_summary column, formatter)
COLUMNS: List[Tuple[str, str, Callable[[Any], str]]] = [
    ("run", "run_id", str),
    ("policy", "policy", _policy),
    ("device", "device_id", str),
    ("samples", "samples", str),
    ("accuracy %", "accuracy", _pct),
    ("offload %", "offload_fraction", _pct),
    ("fallback %", "frac_fallback", _pct),
    ("device mJ/inf gross", "device_j_gross_per_inference", _mj),
    ("device mJ/inf net", "device_j_net_per_inference", _mj),
    ("cloud mJ/inf", "cloud_j_per_inference", _mj),
    ("p50 ms", "latency_p50_ms", _ms),
    ("p95 ms", "latency_p95_ms", _ms),
    ("p99 ms", "latency_p99_ms", _ms),
    ("bytes/inf", "bytes_per_inference", _num),
    ("shed %", "frac_shed", _pct),  # offloads kept at the edge: they add no bytes (tests index the others)
    ("energy source", "energy_source", lambda v: "–" if v is None else str(v)),
]

_TEXT_COLUMNS = ("run", "policy", "device", "energy source")


def summary_cells(run: Dict[str, Any]) -> List[str]:
    return [fmt(run[column]) for _, column, fmt in COLUMNS]


def summary_table(data: ReportData) -> Table:
    """The per-run summary as a rich table."""
    title = f"run {data.run_id}" if data.run_id else f"{len(data.runs)} runs"
    table = Table(title=f"edgecascade results: {title}", header_style="bold")
    for header, _, _ in COLUMNS:
        table.add_column(
            header, justify="left" if header in ("run", "policy", "device", "energy source") else "right"
        )
    for run in data.runs:
        table.add_row(*summary_cells(run))
    return table


def markdown(data: ReportData, files: Dict[str, Path], source: str) -> str:
    """The Markdown report: summary table, the figures, per-class accuracy, and how numbers are defined."""
    lines = [
        "# edgecascade results" + (f": run `{data.run_id}`" if data.run_id else ""),
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{source}`.",
        "",
        "## Summary",
        "",
        "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
        "|" + "|".join("---" if h in _TEXT_COLUMNS else "---:" for h, _, _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(summary_cells(run)) + " |" for run in data.runs]
    captions = {
        "accuracy_energy": "Accuracy against device energy per inference (gross); dashed: the Pareto front.",
        "exit_mix": "Where samples exit: main block, extension block, cloud, or the edge answer after the "
        "cloud missed its deadline (fallback) or instead of an offload that would have missed it (shed).",
        "latency_cdf": "Latency per sample (edge + network + cloud), cumulative.",
    }
    lines += ["", "## Figures", ""]
    for key, path in files.items():
        if key in captions:
            lines += [f"![{key.replace('_', ' ')}]({path.name})", "", f"*{captions[key]}*", ""]
    if data.class_accuracy:
        policies = sorted(data.class_accuracy)
        labels = sorted({label for per in data.class_accuracy.values() for label in per})
        lines += ["## Accuracy per class (%)", "", "| class | " + " | ".join(policies) + " |"]
        lines.append("|---:|" + "---:|" * len(policies))
        for label in labels:
            cells = [_pct(data.class_accuracy[p].get(label)) for p in policies]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Definitions",
        "",
        "- accuracy: correct / labelled samples. offload: (cloud + fallback) / samples; a fallback was",
        "  offloaded but answered at the edge because the reply missed its deadline. shed: the policy chose",
        "  the cloud, the device predicted the answer would come back too late (the workers' load, its own",
        "  round trips) or its offload budget was spent, and answered at the edge; nothing was sent.",
        "- device mJ/inf: mean per-sample device energy, gross (as metered) and net (idle baseline",
        "  subtracted); cloud mJ/inf: the cloud workers' joules over all samples of the run.",
        "- latency = edge_ms + network_ms + cloud_ms; percentiles are nearest-rank (a measured value, the",
        "  same on SQLite and PostgreSQL).",
        "",
    ]
    return "\n".join(lines)


def build_report(
    engine: Engine, out_dir: Path, run_id: Optional[str] = None, *, console: Optional[Console] = None
) -> ReportResult:
    """Print the summary table to `console` (if given) and write the PNGs and report.md into `out_dir`."""
    data = load_report_data(engine, run_id)
    if console is not None:
        console.print(summary_table(data))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ReportResult(data)
    files = {key: out_dir / name for key, name in FIGURES.items()}
    result.series["accuracy_energy"] = plots.plot_accuracy_energy(
        data.pareto, files["accuracy_energy"], highlight_run=run_id or ""
    )
    result.series["exit_mix"] = plots.plot_exit_mix(data.exit_mix, files["exit_mix"])
    result.series["latency_cdf"] = plots.plot_latency_cdf(data.latency_cdf, files["latency_cdf"])
    report = out_dir / "report.md"
    report.write_text(markdown(data, files, engine.url.render_as_string(hide_password=True)))
    result.files = {**files, "report": report}
    return result
