"""A video run's accuracy, from its rows: the frames in SQL against the split's COCO ground truth.

`evaluate_run` reads a run's `frames` rows, maps each (sequence, frame) to its image id in the generated
split (`video.dataset`), evaluates the boxes with pycocotools (`video.evaluate.coco_map`) and stores
mAP@0.5 and mAP@0.5:0.95 in `video_runs`, where `video_run_summary` joins them with the run's rates, bytes,
joules and cloud latency. Only frames of the run are evaluated: a run over part of a split is judged on
that part.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
from sqlalchemy import Engine, delete, insert, select

from results_db.models import Frame, VideoRun


@dataclass(frozen=True)
class RunAccuracy:
    run_id: str
    frames: int
    images: int
    map50: float
    map: float


def evaluate_run(
    engine: Engine,
    run_id: str,
    split: Any,
    *,
    method: str,
    detect_every: Optional[int],
    cloud_every: Optional[int],
    delay_ms: float,
) -> RunAccuracy:
    """Evaluate one run against `split` (a `video.dataset.VideoSplit`) and store the result."""
    from video.dataset import image_id
    from video.detector import Detections
    from video.evaluate import coco_map

    with engine.connect() as connection:
        rows = connection.execute(
            select(Frame.sequence, Frame.frame, Frame.boxes).where(Frame.run_id == run_id)
        ).all()
    detections: Dict[int, Any] = {}
    for sequence, frame, boxes in rows:
        boxes = json.loads(boxes) if isinstance(boxes, str) else boxes
        table = np.asarray(boxes, dtype=np.float32).reshape(-1, 6)
        image = image_id(int(sequence), int(frame), split.frames_per_sequence)
        detections[image] = Detections(table[:, :4], table[:, 4], table[:, 5].astype(np.int64), [])
    result = coco_map(split.coco, detections)
    row = {
        "run_id": run_id,
        "method": method,
        "detect_every": detect_every,
        "cloud_every": cloud_every,
        "delay_ms": float(delay_ms),
        "frames": len(rows),
        "images_evaluated": result.images,
        "map50": result.map50,
        "map": result.map,
        "ground_truth": str(split.root),
        "evaluated_unix": time.time(),
    }
    with engine.begin() as connection:  # evaluating again replaces the earlier figure
        connection.execute(delete(VideoRun).where(VideoRun.run_id == run_id))
        connection.execute(insert(VideoRun), [row])
    return RunAccuracy(run_id, len(rows), result.images, result.map50, result.map)


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
