"""COCO mAP@0.5 and mAP@0.5:0.95 of per-frame detections, with pycocotools (bench/cloud side only).

pycocotools is imported inside `coco_map`, so the device never needs it. Labels 0..9 are COCO categories
1..10 (video.synth.coco_categories); ground-truth objects marked `iscrowd` are ignored regions, as in COCO.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping

from video.detector import Detections

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MapResult:
    map50: float  # mAP at IoU 0.5, COCO's 101-point interpolation, mean over categories with ground truth
    map: float  # mean over IoU 0.50:0.05:0.95
    images: int
    detections: int


def detections_to_coco(detections: Mapping[int, Detections]) -> List[Dict[str, Any]]:
    """COCO result records ([x, y, w, h], score, category_id) of {image_id: Detections}."""
    out = []
    for image_id, dets in detections.items():
        for box, score, label in zip(dets.boxes, dets.scores, dets.labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            out.append(
                {
                    "image_id": int(image_id),
                    "bbox": [x1, y1, max(x2 - x1, 0.0), max(y2 - y1, 0.0)],
                    "score": float(score),
                    "category_id": int(label) + 1,
                }
            )
    return out


def coco_map(ground_truth: Dict[str, Any], detections: Mapping[int, Detections]) -> MapResult:
    """Evaluate over the images in `detections` (others in the ground truth are left out)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted(int(i) for i in detections)
    results = detections_to_coco(detections)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        if not results:
            return MapResult(0.0, 0.0, len(image_ids), 0)
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = image_ids
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats
    return MapResult(
        map50=max(float(stats[1]), 0.0),
        map=max(float(stats[0]), 0.0),
        images=len(image_ids),
        detections=len(results),
    )
