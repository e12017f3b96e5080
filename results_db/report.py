"""`edgecascade report`: a terminal summary (rich), three PNG figures, a Markdown report and the same report
as one self-contained HTML page (`report_html`), from the database.

All numbers come from the SQL views (`run_summary`, `class_accuracy`, `inference_facts`), so the report and
a user's own queries always agree. The accuracy-vs-energy figure draws its Pareto fronts itself, one per
energy basis (`results_db.labels`): the `pareto_points` view puts estimated and metered joules on one front.
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
from results_db.drift_report import FIGURE as DRIFT_FIGURE
from results_db.drift_report import drift_markdown
from results_db.labels import FLAT_OUT, METERED, energy_basis, run_pace
from results_db.report_html import render_html

FIGURES = {
    "accuracy_energy": "accuracy_energy.png",
    "exit_mix": "exit_mix.png",
    "latency_cdf": "latency_cdf.png",
}
UNKNOWN_POLICY = "(unknown)"  # runs whose `run` record has not arrived
CurveKey = Tuple[str, str]  # (policy, pace): one latency curve


@dataclass
class ReportData:
    """What the report shows, read from the database once."""

    runs: List[Dict[str, Any]]  # run_summary rows (one run with --run)
    all_runs: List[Dict[str, Any]]  # run_summary rows of every run: one run is seen among the others
    exit_mix: Dict[str, Dict[str, float]]  # policy -> exit stage -> fraction of samples
    # (policy, pace) -> (latency ms, fraction <= it): paced and flat-out runs are never one curve
    latency_cdf: Dict[CurveKey, Tuple[List[float], List[float]]]
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
    all_runs = _rows(engine, "SELECT * FROM run_summary ORDER BY policy, run_id")

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

    paces = {
        row["run_id"]: run_pace(row["run_id"], row["policy_params"])
        for row in _rows(engine, f"SELECT run_id, policy_params FROM runs {where}", **params)
    }
    latencies: Dict[CurveKey, List[float]] = {}
    for row in _rows(
        engine,
        f"SELECT run_id, policy, latency_ms FROM inference_facts {where} ORDER BY latency_ms",
        **params,
    ):
        key = (_policy(row["policy"]), paces.get(row["run_id"], FLAT_OUT))
        latencies.setdefault(key, []).append(row["latency_ms"])
    cdfs = {p: ecdf(values, cdf_points) for p, values in latencies.items()}

    per_class: Dict[str, Dict[int, float]] = {}
    for row in _rows(
        engine,
        f"SELECT policy, label, SUM(correct) AS correct, SUM(samples) AS samples FROM class_accuracy {where} "
        "GROUP BY policy, label ORDER BY label",
        **params,
    ):
        per_class.setdefault(_policy(row["policy"]), {})[int(row["label"])] = row["correct"] / row["samples"]
    return ReportData(runs, all_runs, exit_mix, cdfs, per_class, run_id)


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
    ("analytic mJ/inf", "device_j_analytic_per_inference", _mj),  # the model's, never a measurement
]

_TEXT_COLUMNS = ("run", "policy", "device", "energy source")


def unmetered_note(runs: List[Dict[str, Any]]) -> Optional[str]:
    """One sentence under the table naming the runs whose gross/net joules no meter measured, or None."""
    unmetered = [r for r in runs if energy_basis(r["energy_source"]) != METERED]
    if not unmetered:
        return None
    sources = sorted({str(r["energy_source"]) for r in unmetered})
    return (
        f"No meter was read for {len(unmetered)} of {len(runs)} runs (energy source {', '.join(sources)}): "
        "their gross and net mJ/inf are the labelled estimate (process CPU time x assumed watts per core) "
        "or empty, not measurements; the accuracy-vs-energy figure places them by the analytic column."
    )


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
    table.caption = unmetered_note(data.runs)
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
    note = unmetered_note(data.runs)
    if note:
        lines += ["", f"*{note}*"]
    captions = {
        "accuracy_energy": "Accuracy against device energy per inference; dashed: the Pareto front. Runs a "
        "meter measured are placed by their gross joules; runs where no meter was read by their analytic "
        "joules, in a panel of their own whose axis says so. Paced latency runs are left out (they see only "
        "the first few hundred items).",
        "exit_mix": "Where samples exit: main block, extension block, cloud, or the edge answer after the "
        "cloud missed its deadline (fallback) or instead of an offload that would have missed it (shed).",
        "latency_cdf": "Latency per sample (edge + network + cloud), cumulative, one curve per policy and "
        "pace: paced runs (dashed; service time at a camera's rate) are never merged with flat-out runs "
        "(solid; mostly queueing in front of a saturated worker).",
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
        "  subtracted); cloud mJ/inf: the cloud workers' joules over all samples of the run. Energy source",
        "  names the meter; `estimate` is process CPU time x assumed watts per core, not a measurement.",
        "  analytic mJ/inf: the model card's MACs and bytes x Horowitz's 45 nm energies per operation.",
        "- latency = edge_ms + network_ms + cloud_ms; percentiles are nearest-rank (a measured value, the",
        "  same on SQLite and PostgreSQL).",
        "",
    ]
    return "\n".join(lines)


def build_report(
    engine: Engine, out_dir: Path, run_id: Optional[str] = None, *, console: Optional[Console] = None
) -> ReportResult:
    """Print the summary table to `console` (if given); write the PNGs, report.md and report.html."""
    data = load_report_data(engine, run_id)
    if console is not None:
        console.print(summary_table(data))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ReportResult(data)
    files = {key: out_dir / name for key, name in FIGURES.items()}
    result.series["accuracy_energy"] = plots.plot_accuracy_energy(
        data.all_runs, files["accuracy_energy"], highlight_run=run_id or ""
    )
    result.series["exit_mix"] = plots.plot_exit_mix(data.exit_mix, files["exit_mix"])
    result.series["latency_cdf"] = plots.plot_latency_cdf(data.latency_cdf, files["latency_cdf"])
    report = out_dir / "report.md"
    text_md = markdown(data, files, engine.url.render_as_string(hide_password=True))
    drift = drift_markdown(engine, out_dir, run_id)  # empty when no device tested for drift
    if drift:
        text_md += "\n" + drift
        files["drift"] = out_dir / DRIFT_FIGURE
    report.write_text(text_md)
    page = out_dir / "report.html"
    page.write_text(render_html(text_md, out_dir, title=text_md.splitlines()[0].lstrip("# ")))
    result.files = {**files, "report": report, "html": page}
    return result
