"""The report's three figures, drawn with matplotlib's object API on the Agg canvas (no pyplot state).

Each function writes one PNG and returns the series it plotted, so a test can check the picture's data
against SQL rather than pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from protocol.records import EXIT_STAGES

STAGE_COLOURS = {
    "main": "#4c72b0",
    "extension": "#55a868",
    "cloud": "#dd8452",
    "fallback": "#c44e52",
    "shed": "#8172b3",
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


def plot_accuracy_energy(
    points: Sequence[Dict[str, Any]], path: Path, *, highlight_run: str = ""
) -> Dict[str, Any]:
    """Accuracy against device gross J/inference, one marker per run, the Pareto front as a step line.

    `points` are rows of the `pareto_points` view. Returns {"points": [(run_id, policy, mJ, accuracy %)],
    "front": [(mJ, accuracy %)]}.
    """
    figure = _new_figure()
    ax = figure.add_subplot()
    series: List[Tuple[str, str, float, float]] = []
    policies = sorted({str(p["policy"]) for p in points})
    colours = {name: f"C{i % 10}" for i, name in enumerate(policies)}
    for policy in policies:
        mine = [p for p in points if str(p["policy"]) == policy]
        xs = [p["device_j_gross_per_inference"] * 1e3 for p in mine]
        ys = [p["accuracy"] * 100 for p in mine]
        ax.scatter(xs, ys, s=46, color=colours[policy], label=policy, zorder=3, edgecolors="white")
        series += [(p["run_id"], policy, x, y) for p, x, y in zip(mine, xs, ys)]
    front = pareto_front([(x, y) for _, _, x, y in series])
    if front:
        fx, fy = zip(*front)
        # The front as a staircase: nothing lies above-left of it; everything below-right is dominated.
        ax.step(fx, fy, where="post", color="0.3", linestyle="--", linewidth=1.2, zorder=2)
        ax.scatter(
            fx, fy, s=130, facecolors="none", edgecolors="0.2", linewidths=1.2, zorder=4, label="Pareto front"
        )
    for run_id, _, x, y in series:
        if run_id == highlight_run or (not highlight_run and len(series) <= 12):
            ax.annotate(run_id, (x, y), textcoords="offset points", xytext=(7, 5), fontsize=7, color="0.25")
        if run_id == highlight_run:
            ax.scatter([x], [y], s=300, facecolors="none", edgecolors="black", linewidths=2.0, zorder=5)
    ax.set_xlabel("device energy per inference, gross (mJ)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs device energy per inference (up and left is better)")
    ax.grid(True, alpha=0.3)
    ax.margins(0.12)
    if series:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.text(0.5, 0.5, "no run has both accuracy and energy", ha="center", transform=ax.transAxes)
    figure.savefig(path, format="png")
    return {"points": series, "front": front}


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


def plot_latency_cdf(cdfs: Dict[str, Tuple[List[float], List[float]]], path: Path) -> Dict[str, Any]:
    """Empirical CDF of total latency (ms, log axis), one line per policy (or run)."""
    figure = _new_figure()
    ax = figure.add_subplot()
    for i, (name, (xs, ys)) in enumerate(sorted(cdfs.items())):
        ax.step(xs, [y * 100 for y in ys], where="post", color=f"C{i % 10}", label=name, linewidth=1.4)
    if cdfs and all(xs and min(xs) > 0 for xs, _ in cdfs.values()):
        ax.set_xscale("log")  # edge exits and cloud round trips differ by orders of magnitude
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
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
    return {name: cdfs[name] for name in sorted(cdfs)}


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
