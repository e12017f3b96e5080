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
from video.dataset import image_id
from video.detector import Detections
from video.evaluate import coco_map


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
