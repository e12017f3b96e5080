"""The REACT benchmark's tables and its targets, PASS/FAIL (as `bench/targets.py` for classification)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple


def targets(rows: List[Dict[str, Any]], quick: bool, seconds: float) -> List[Tuple[str, str, bool]]:
    """(target, measured, met) for each of issue #15's targets that these rows can decide."""

    def find(method: str, delay: float, k: int = 5) -> Optional[Dict[str, Any]]:
        return next(
            (
                r
                for r in rows
                if r["method"] == method
                and r["delay_ms"] == delay
                and (r["k"] == k or method in ("cloud-only", "edge-only"))
                and not r["worker_killed"]
                and r["m"] is None
            ),
            None,
        )

    out: List[Tuple[str, str, bool]] = []
    edge, react, cloud = find("edge-only", 0, 1), find("react", 300), find("cloud-only", 300)
    if edge and react and cloud:
        need = max(edge["map50"], cloud["map50"]) + 0.05
        out.append(
            (
                "REACT mAP@0.5 >= max(edge-only, cloud-only) + 5 points at 300 ms",
                f"{100 * react['map50']:.1f} vs {100 * edge['map50']:.1f} / {100 * cloud['map50']:.1f}",
                react["map50"] >= need,
            )
        )
    if edge:
        reacts = [
            r
            for r in rows
            if r["method"] == "react" and r["k"] == 5 and r["m"] is None and not r["worker_killed"]
        ]
        worst = min(reacts, key=lambda r: r["map50"]) if reacts else None
        if worst:
            out.append(
                (
                    "REACT mAP@0.5 >= edge-only at every delay (k = 5)",
                    f"lowest {100 * worst['map50']:.1f} at {worst['delay_ms']:g} ms "
                    f"vs {100 * edge['map50']:.1f}",
                    worst["map50"] >= edge["map50"],
                )
            )
        out.append(
            ("edge detector >= 30 fps on one core", f"{edge['loop_fps']} fps", (edge["loop_fps"] or 0) >= 30)
        )
    if react:
        out.append(
            (
                "device loop (k = 5, tracker, fusion) >= 30 fps",
                f"{react['loop_fps']} fps",
                (react["loop_fps"] or 0) >= 30,
            )
        )
    short = [r for r in rows if r["frames"] != r["expected_frames"]]
    killed = [r for r in rows if r["worker_killed"]]
    out.append(
        (
            "0 frames lost (one row per frame per run), a cloud worker SIGKILL included",
            f"{len(rows) - len(short)}/{len(rows)} runs complete"
            + (f"; {len(killed)} with the kill" if killed else ""),
            not short and bool(killed),
        )
    )
    if quick:
        out.append(
            ("`edgecascade bench --task video --quick` <= 3 min", f"{seconds / 60:.1f} min", seconds <= 180)
        )
    return out


def print_tables(result: Any, console: Any) -> None:
    """The runs' table and the targets' table of a `bench.video_bench.VideoBenchResult`."""
    from rich.table import Table

    table = Table(
        title=f"REACT video detection: {result.clips} test clips x {result.frames_per_clip} frames at 30 fps"
    )
    for column in (
        "run",
        "mAP@0.5",
        "mAP",
        "frames",
        "fps",
        "loop fps",
        "device mJ/frame",
        "analytic mJ",
        "bytes/frame",
        "sent",
        "cloud p50 ms",
    ):
        table.add_column(column, justify="right")
    for r in result.rows:
        table.add_row(
            r["label"],
            f"{100 * r['map50']:.1f}",
            f"{100 * r['map']:.1f}",
            f"{r['frames']}/{r['expected_frames']}",
            f"{r['fps']:.1f}",
            str(r["loop_fps"]),
            "–" if r["device_j_per_frame"] is None else f"{1000 * r['device_j_per_frame']:.2f}",
            "–"
            if r["device_j_analytic_per_frame"] is None
            else f"{1000 * r['device_j_analytic_per_frame']:.3f}",
            f"{r['bytes_per_frame']:.0f}",
            f"{100 * r['sent_fraction']:.0f} %",
            "–" if r["cloud_latency_p50_ms"] is None else f"{r['cloud_latency_p50_ms']:.0f}",
        )
    console.print(table)
    targets = Table(title="REACT targets")
    for column in ("target", "measured", ""):
        targets.add_column(column)
    for name, measured, ok in result.targets:
        targets.add_row(name, measured, "[green]PASS[/]" if ok else "[red]FAIL[/]")
    console.print(targets)
