"""The benchmark's table (one row per policy, from the `run_summary` view) and its targets, PASS/FAIL."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from rich.markup import escape
from rich.table import Table
from sqlalchemy import text
from sqlalchemy.engine import Engine

from device_agent.card import load_card
from metering.analytic import AnalyticModel

COLUMNS = [
    ("policy", "label", "{}"),
    ("samples", "samples", "{:,}"),
    ("accuracy", "accuracy", "{:.2%}"),
    ("main/ext/cloud/fallback/shed", "exit_mix", "{}"),
    ("device mJ/inf gross", "device_j_gross_per_inference", "mJ"),
    ("net", "device_j_net_per_inference", "mJ"),
    ("analytic", "device_j_analytic_per_inference", "mJ"),
    ("cloud mJ/inf", "cloud_j_per_inference", "mJ"),
    ("p50 ms {pace}", "paced_p50_ms", "{:.2f}"),
    ("p99 ms {pace}", "paced_p99_ms", "{:.2f}"),
    ("bytes/inf", "bytes_per_inference", "{:.0f}"),
    ("offload", "offload_fraction", "{:.1%}"),
    ("samples/s flat out", "samples_per_s", "{:,.0f}"),
]


def summaries(engine: Engine, runs: Dict[str, str]) -> Dict[str, Dict[str, Any]]:
    """run_summary rows keyed by the benchmark's label of each run."""
    with engine.connect() as conn:
        rows = {r["run_id"]: dict(r) for r in conn.execute(text("SELECT * FROM run_summary")).mappings()}
    out = {}
    for label, run_id in runs.items():
        if run_id in rows:
            row = rows[run_id]
            row["label"] = label
            row["exit_mix"] = "/".join(
                f"{100 * (row.get(f'frac_{s}') or 0):.0f}"
                for s in ("main", "extension", "cloud", "fallback", "shed")
            )
            out[label] = row
    return out


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "—"
    if fmt == "mJ":
        return f"{1e3 * value:.3f}"
    return fmt.format(value)


def with_latency(
    rows: Dict[str, Dict[str, Any]], paced: Dict[str, Dict[str, Any]], rate_hz: float
) -> Dict[str, Dict[str, Any]]:
    """Each row gets `paced_p50_ms`/`paced_p99_ms`: from its paced run at `rate_hz`, or, without paced runs,
    from the flat-out run itself (then the columns say "flat out": queueing, not service)."""
    out = {}
    for label, row in rows.items():
        source = paced.get(label, {}) if rate_hz else row
        out[label] = {
            **row,
            "paced_p50_ms": source.get("latency_p50_ms"),
            "paced_p99_ms": source.get("latency_p99_ms"),
        }
    return out


def pace_label(rate_hz: float) -> str:
    return f"@ {rate_hz:g} Hz" if rate_hz else "flat out"


def policy_table(
    rows: Dict[str, Dict[str, Any]], throughput: Dict[str, float], rate_hz: float = 0.0
) -> Table:
    """One row per policy: accuracy, energy and throughput of its flat-out run, latency of its paced run."""
    table = Table(
        title="edgecascade bench: one row per policy (J/inference in mJ; exit mix in %; "
        f"latency {pace_label(rate_hz)}, throughput flat out)"
    )
    for header, _, _ in COLUMNS:
        header = header.format(pace=pace_label(rate_hz))
        table.add_column(header, justify="left" if header == "policy" else "right")
    for label, row in rows.items():
        row = {**row, "samples_per_s": throughput.get(label)}
        table.add_row(*[escape(_cell(row.get(key), fmt)) for _, key, fmt in COLUMNS])
    return table


def evaluate(
    rows: Dict[str, Dict[str, Any]],
    throughput: Dict[str, float],
    models: Path,
    per_run: int,
    rate_hz: float = 0.0,
) -> List[Tuple[str, str, bool]]:
    """The issue's targets as (target, measured, met); `rows` as `with_latency` leaves them."""
    out: List[Tuple[str, str, bool]] = []
    acc = {k: v.get("accuracy") for k, v in rows.items()}
    meanet, cloud, edge = rows.get("meanet"), acc.get("cloud-only"), acc.get("edge-only")
    if meanet and cloud is not None and edge is not None:
        m = meanet["accuracy"]
        out.append(("meanet accuracy >= cloud-only - 0.3 pp", f"{m:.2%} vs {cloud:.2%}", m >= cloud - 0.003))
        off = meanet["offload_fraction"]
        out.append(("meanet offload <= 25 %", f"{off:.1%}", off <= 0.25))
        out.append(("meanet accuracy >= edge-only + 1.5 pp", f"{m:.2%} vs {edge:.2%}", m >= edge + 0.015))
        card = load_card(models)
        cloud_on_device = AnalyticModel.for_card(card.raw).block_j("cloud")
        mj = meanet.get("device_j_analytic_per_inference")
        if mj is not None:
            out.append(
                (
                    "meanet device J/inf (analytic) <= 50 % of the cloud model on the device",
                    f"{1e3 * mj:.3f} mJ vs {1e3 * cloud_on_device:.3f} mJ ({mj / cloud_on_device:.0%})",
                    mj <= 0.5 * cloud_on_device,
                )
            )
    complete = [k for k, v in rows.items() if v["samples"] == per_run]
    out.append(
        (
            "one row per sample, every policy",
            f"{len(complete)}/{len(rows)} runs complete",
            len(complete) == len(rows) and bool(rows),
        )
    )
    lost = sum(max(per_run - v["samples"], 0) for v in rows.values())
    fallbacks = sum((v.get("exit_fallback") or 0) for v in rows.values())
    out.append(
        ("zero lost offloads", f"{lost} lost; {fallbacks} answered at the edge after the deadline", lost == 0)
    )
    http, mqtt = throughput.get("http-peer"), throughput.get("meanet")
    if http and mqtt and "http-peer" in rows and meanet:
        out.append(
            (
                "MQTT path throughput >= 2x HTTP peer",
                f"{mqtt:,.0f} vs {http:,.0f}/s ({mqtt / http:.2f}x)",
                mqtt >= 2 * http,
            )
        )
        p_m, p_h = meanet.get("paced_p50_ms"), rows["http-peer"].get("paced_p50_ms")
        if p_m is not None and p_h is not None:
            out.append(
                (
                    f"MQTT latency p50 no worse than HTTP ({pace_label(rate_hz)})",
                    f"{p_m:.2f} vs {p_h:.2f} ms",
                    p_m <= p_h * 1.05,
                )
            )
    return out


def targets_table(targets: List[Tuple[str, str, bool]], seconds: Optional[float] = None) -> Table:
    title = "targets" + (f" (bench took {seconds / 60:.1f} min)" if seconds else "")
    table = Table(title=title)
    for col in ("target", "measured", "result"):
        table.add_column(col)
    for name, measured, ok in targets:
        table.add_row(name, measured, "[green]PASS[/]" if ok else "[red]FAIL[/]")
    return table
