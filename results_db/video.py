"""The REACT video task's report: mAP against the injected cloud delay, per method, from SQL.

`video_runs` (written by `bench.video_eval.evaluate_run`) and `video_run_summary` hold the figures; this
only reads them.
"""

from __future__ import annotations

from typing import Any, Dict

from sqlalchemy import Engine


def video_report(engine: Engine, out_dir: Any) -> Dict[str, Any]:
    """`video-map.png` (mAP@0.5 against the injected delay, per method) and `video.md` (the summary)."""
    from pathlib import Path

    from sqlalchemy import text

    from results_db import plots

    with engine.connect() as connection:
        rows = [dict(r._mapping) for r in connection.execute(text("SELECT * FROM video_run_summary"))]
    rows = [r for r in rows if r["map50"] is not None]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "video-map.png"
    series = plots.plot_video_map(rows, figure)
    lines = [
        "# REACT video detection",
        "",
        f"![mAP against cloud delay]({figure.name})",
        "",
        "| method | k | m | delay ms | mAP@0.5 | mAP | fps | device mJ/frame | bytes/frame | cloud p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(
        rows, key=lambda r: (r["method"], r["detect_every"] or 0, r["cloud_every"] or 0, r["delay_ms"])
    ):
        energy = "–" if r["device_j_per_frame"] is None else f"{1000 * r['device_j_per_frame']:.2f}"
        p50 = "–" if r["cloud_latency_p50_ms"] is None else f"{r['cloud_latency_p50_ms']:.0f}"
        lines.append(
            f"| {r['method']} | {r['detect_every'] or '–'} | {r['cloud_every'] or '–'} | {r['delay_ms']:g} | "
            f"{100 * r['map50']:.1f} | {100 * r['map']:.1f} | {r['fps'] or 0:.1f} | {energy} | "
            f"{r['bytes_per_frame']:.0f} | {p50} |"
        )
    (out / "video.md").write_text("\n".join(lines) + "\n")
    return {"figure": figure, "series": series, "rows": rows}
