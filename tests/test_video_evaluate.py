"""COCO mAP through pycocotools against APs computed by hand (101-point interpolation)."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.sources import FASHION_MNIST_CLASSES
from video.detector import Detections
from video.evaluate import coco_map
from video.synth import coco_categories

pytest.importorskip("pycocotools")


def _gt() -> dict:
    boxes = [  # (image, [x, y, w, h], category, iscrowd)
        (1, [0, 0, 20, 20], 1, 0),  # A
        (1, [50, 50, 20, 20], 1, 0),  # B
        (1, [0, 60, 10, 10], 2, 0),  # C
        (2, [30, 30, 20, 20], 1, 1),  # an ignored (heavily occluded) object
    ]
    return {
        "images": [{"id": i, "width": 128, "height": 128} for i in (1, 2)],
        "annotations": [
            {"id": n + 1, "image_id": i, "bbox": b, "area": b[2] * b[3], "category_id": c, "iscrowd": z}
            for n, (i, b, c, z) in enumerate(boxes)
        ],
        "categories": coco_categories(FASHION_MNIST_CLASSES),
    }


def _dets(rows: list) -> Detections:
    a = np.array(rows, dtype=np.float32).reshape(-1, 6)
    return Detections(a[:, :4], a[:, 4], a[:, 5].astype(np.int64), [])


def test_map_matches_the_hand_computed_ap() -> None:
    detections = {
        # class 0 (category 1): hit A at 0.9, a false positive at 0.8, hit B at 0.7
        # class 1 (category 2): C found with IoU 0.72 (10 x 7.2 inside 10 x 10)
        1: _dets(
            [
                [0, 0, 20, 20, 0.9, 0],
                [90, 0, 110, 20, 0.8, 0],
                [50, 50, 70, 70, 0.7, 0],
                [0, 60, 10, 67.2, 0.6, 1],
            ]
        ),
        2: _dets([[30, 30, 50, 50, 0.95, 0]]),  # on the ignored object: neither hit nor false positive
    }
    result = coco_map(_gt(), detections)
    # category 1: precision 1 up to recall 0.5 (51 of 101 recall points), then 2/3 -> the same at every IoU
    ap1 = (51 * 1.0 + 50 * 2 / 3) / 101
    # category 2: AP 1 at IoU 0.50 ... 0.70 (5 thresholds), 0 at 0.75 ... 0.95
    assert result.map50 == pytest.approx((ap1 + 1.0) / 2, abs=1e-6)
    assert result.map == pytest.approx((ap1 + 0.5) / 2, abs=1e-6)
    assert (result.images, result.detections) == (2, 5)


def test_no_detections_is_zero_and_perfect_detections_are_one() -> None:
    gt = _gt()
    assert coco_map(gt, {1: Detections.empty(), 2: Detections.empty()}).map50 == 0.0
    perfect = {1: _dets([[0, 0, 20, 20, 0.9, 0], [50, 50, 70, 70, 0.8, 0], [0, 60, 10, 70, 0.7, 1]])}
    result = coco_map(gt, perfect)
    assert result.map50 == pytest.approx(1.0) and result.map == pytest.approx(1.0)
