"""The report's three figures, drawn with matplotlib's object API on the Agg canvas (no pyplot state).

Each function writes one PNG and returns the series it plotted, so a test can check the picture's data
against SQL rather than pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from protocol.records import EXIT_STAGES
from results_db.labels import (
    ANALYTIC,
    FLAT_OUT,
    METERED,
    energy_basis,
    plotted_j_per_inference,
    run_pace,
)

STAGE_COLOURS = {
    "main": "#4c72b0",
    "extension": "#55a868",
    "cloud": "#dd8452",
    "fallback": "#c44e52",
    "shed": "#8172b3",
    "gateway": "#937860",
}
DPI = 110


def _new_figure(width_in: float = 7.0, height_in: float = 4.5) -> Figure:
    figure = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """Points (energy, accuracy) no other point beats on both (less energy, more accuracy), by energy."""
    front: List[Tuple[float, float]] = []
    for energy, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((energy, accuracy))
    return front


def _energy_axis_label(basis: str, sources: Sequence[str]) -> str:
    if basis == METERED:
        return f"device energy per inference, gross, metered by {', '.join(sources)} (mJ)"
    return (
        f"device energy per inference, ANALYTIC (card MACs x pJ/op; no meter read: {', '.join(sources)}) (mJ)"
    )


def plot_accuracy_energy(
    runs: Sequence[Dict[str, Any]], path: Path, *, highlight_run: str = ""
) -> Dict[str, Dict[str, Any]]:
    """Accuracy against device J/inference, one marker per run, each panel's Pareto front as a step line.

    `runs` are rows of the `run_summary` view. Runs a meter measured are drawn on their gross joules; runs
    where no meter was read (`results_db.energy`) on their analytic joules, in a panel of their own whose
    axis says so: a CPU-time estimate is never drawn as if it were a measurement, and the two kinds are
    never on one axis. Returns {basis: {"points": [(run_id, policy, mJ, accuracy %)], "front": [(mJ,
    accuracy %)], "xlabel": str}} for the bases drawn (`metered` first).
    """
    panels: Dict[str, List[Dict[str, Any]]] = {}
    for run in runs:
        if run_pace(str(run.get("run_id", "")), run.get("policy_params")) != FLAT_OUT:
            continue  # a latency run on the first few hundred items: another sample set, not comparable
        if run.get("accuracy") is not None and plotted_j_per_inference(run) is not None:
            panels.setdefault(energy_basis(run.get("energy_source")), []).append(run)
    bases = [b for b in (METERED, ANALYTIC) if b in panels]
    figure = _new_figure(7.0 if len(bases) < 2 else 12.0, 4.5)
    axes = figure.subplots(1, max(1, len(bases)), sharey=True, squeeze=False)[0]
    policies = sorted({str(r["policy"]) for r in runs})
    colours = {name: f"C{i % 10}" for i, name in enumerate(policies)}
    out: Dict[str, Dict[str, Any]] = {}
    for ax, basis in zip(axes, bases):
        mine = panels[basis]
        series: List[Tuple[str, str, float, float]] = []
        for policy in policies:
            of_policy = [r for r in mine if str(r["policy"]) == policy]
            if not of_policy:
                continue
            xs = [float(plotted_j_per_inference(r) or 0.0) * 1e3 for r in of_policy]
            ys = [r["accuracy"] * 100 for r in of_policy]
            ax.scatter(xs, ys, s=46, color=colours[policy], label=policy, zorder=3, edgecolors="white")
            series += [(r["run_id"], policy, x, y) for r, x, y in zip(of_policy, xs, ys)]
        front = pareto_front([(x, y) for _, _, x, y in series])
        fx, fy = zip(*front)
        # The front as a staircase: nothing lies above-left of it; everything below-right is dominated.
        ax.step(fx, fy, where="post", color="0.3", linestyle="--", linewidth=1.2, zorder=2)
        ax.scatter(
            fx, fy, s=130, facecolors="none", edgecolors="0.2", linewidths=1.2, zorder=4, label="Pareto front"
        )
        for run_id, _, x, y in series:
            if run_id == highlight_run or (not highlight_run and len(series) <= 12):
                ax.annotate(
                    run_id, (x, y), textcoords="offset points", xytext=(7, 5), fontsize=7, color="0.25"
                )
            if run_id == highlight_run:
                ax.scatter([x], [y], s=300, facecolors="none", edgecolors="black", linewidths=2.0, zorder=5)
        sources = sorted({str(r.get("energy_source")) for r in mine})
        xlabel = _energy_axis_label(basis, sources)
        ax.set_xlabel(xlabel, fontsize=8 if len(bases) > 1 else 9)
        ax.set_title("measured joules" if basis == METERED else "no meter read: analytic joules", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.margins(0.12)
        out[basis] = {"points": series, "front": front, "xlabel": xlabel}
    axes[0].set_ylabel("accuracy (%)")
    figure.suptitle("Accuracy vs device energy per inference (up and left is better)", fontsize=11)
    if bases:
        handles: Dict[str, Any] = {}
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        handles["Pareto front"] = handles.pop("Pareto front")  # after the policies of every panel
        axes[-1].legend(
            list(handles.values()), list(handles), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0)
        )
    else:
        axes[0].text(
            0.5, 0.5, "no run has both accuracy and energy", ha="center", transform=axes[0].transAxes
        )
    figure.savefig(path, format="png")
    return out


def plot_exit_mix(mix: Dict[str, Dict[str, float]], path: Path) -> Dict[str, Dict[str, float]]:
    """Stacked bars: for each policy, the fraction of samples that exited at each stage."""
    figure = _new_figure(max(5.0, 1.2 * len(mix) + 3.0), 4.5)
    ax = figure.add_subplot()
    policies = sorted(mix)
    bottoms = [0.0] * len(policies)
    for stage in EXIT_STAGES:
        heights = [mix[p].get(stage, 0.0) * 100 for p in policies]
        bars = ax.bar(policies, heights, bottom=bottoms, color=STAGE_COLOURS[stage], label=stage, width=0.6)
        ax.bar_label(
            bars,
            labels=[f"{h:.0f}%" if h >= 6 else "" for h in heights],
            label_type="center",
            fontsize=8,
            color="white",
        )
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_ylabel("samples (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Where samples exit, per policy")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(axis="x", labelrotation=20)
    figure.savefig(path, format="png")
    return {p: dict(mix[p]) for p in policies}


def _minor_log_label(value: float, _: Any) -> str:
    mantissa = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:g}" if mantissa in (2, 3, 5) else ""


def plot_latency_cdf(
    cdfs: Dict[Tuple[str, str], Tuple[List[float], List[float]]], path: Path
) -> Dict[Tuple[str, str], Any]:
    """Empirical CDF of total latency (ms, log axis), one line per (policy, pace): a colour per policy,
    solid when flat out, dashed when paced, so the two kinds of run never share a curve."""
    figure = _new_figure()
    ax = figure.add_subplot()
    policies = sorted({policy for policy, _ in cdfs})
    for (policy, pace), (xs, ys) in sorted(cdfs.items()):
        ax.step(
            xs,
            [y * 100 for y in ys],
            where="post",
            color=f"C{policies.index(policy) % 10}",
            linestyle="-" if pace == FLAT_OUT else "--",
            label=f"{policy}, {pace}",
            linewidth=1.4,
        )
    if cdfs and all(xs and min(xs) > 0 for xs, _ in cdfs.values()):
        ax.set_xscale("log")  # edge exits and cloud round trips differ by orders of magnitude
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        # On a short range matplotlib labels minor ticks too: as 2, 3, 5 (x 10^k), not 6x10^-1 at every one.
        ax.xaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
    for q in (50, 95, 99):
        ax.axhline(q, color="0.75", linewidth=0.8, zorder=0)
        ax.annotate(
            f"p{q}",
            (1.0, q),
            xycoords=("axes fraction", "data"),
            xytext=(3, -3),
            textcoords="offset points",
            fontsize=7,
            color="0.4",
        )
    ax.set_xlabel("latency per sample: edge + network + cloud (ms)")
    ax.set_ylabel("samples at or below (%)")
    ax.set_ylim(0, 100.5)
    ax.set_title("Latency CDF")
    ax.grid(True, which="both", alpha=0.25)
    if cdfs:
        ax.legend(fontsize=8, loc="lower right")
    figure.savefig(path, format="png")
    return {key: cdfs[key] for key in sorted(cdfs)}


def plot_video_map(rows: Sequence[Dict[str, Any]], path: Path) -> Dict[str, List[Tuple[float, float]]]:
    """mAP@0.5 against the injected cloud delay, one line per method that uses the cloud (the best k / m
    left out: one setting per method), the edge-only methods as flat references."""
    figure = _new_figure()
    ax = figure.add_subplot()
    series: Dict[str, List[Tuple[float, float]]] = {}
    for r in rows:
        uses_cloud = r["method"] == "cloud-only" or (r["method"] == "react" and r["detect_every"] == 5)
        if uses_cloud and r["cloud_every"] is None:
            series.setdefault(r["method"], []).append((float(r["delay_ms"]), 100.0 * float(r["map50"])))
    for i, (name, points) in enumerate(sorted(series.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{i}", label=name)
    for j, method in enumerate(("edge-only", "edge+tracker")):
        flat = [100.0 * r["map50"] for r in rows if r["method"] == method and r["detect_every"] in (1, 5)]
        if flat:
            ax.axhline(flat[0], color=f"C{j + 2}", linestyle="--", linewidth=1.2, label=f"{method}, no cloud")
    ax.set_xlabel("injected cloud delay (ms)")
    ax.set_ylabel("mAP@0.5 (%)")
    ax.set_title("REACT: detection accuracy against cloud latency (synthetic video, test clips)")
    ax.grid(True, alpha=0.25)
    if series:
        ax.legend(fontsize=8, loc="lower left")
    figure.savefig(path, format="png")
    return series
