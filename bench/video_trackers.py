"""Cost per box per frame and accuracy of each box tracker on the synthetic test sequences, on one core.

    python -m bench.video_trackers --test build/video/test --sequences 2

Boxes start from the ground truth every `--every` frames and are tracked through the frames in between
(what the device does between detector runs); accuracy is the mean IoU with the same object's true box at
the last tracked frame. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

logger = logging.getLogger(__name__)


def _gt_boxes(anns: List[dict]) -> Dict[int, np.ndarray]:
    out = {}
    for a in anns:
        if not a["iscrowd"]:
            x, y, w, h = a["bbox"]
            out[a["track_id"]] = np.array([x, y, x + w, y + h], dtype=np.float32)
    return out


def measure(tracker_factory, split, sequences: int, every: int) -> Dict[str, float]:  # type: ignore[no-untyped-def]
    from video.detector import box_iou

    seconds, box_frames, ious, lost = 0.0, 0, [], 0
    by_image = split.annotations_by_image()
    for s in range(sequences):
        frames = split.frames(s)
        ids = split.image_ids(s)
        for start in range(0, len(frames) - every, every):
            gt0 = _gt_boxes(by_image[ids[start]])
            if not gt0:
                continue
            keys = sorted(gt0)
            boxes = np.stack([gt0[k] for k in keys])
            tracker = tracker_factory()
            ok = np.ones(len(boxes), dtype=bool)
            for t in range(start + 1, start + every):
                t0 = time.perf_counter()
                boxes, step_ok = tracker.track(frames[t - 1], frames[t], boxes)
                seconds += time.perf_counter() - t0
                box_frames += len(boxes)
                ok &= step_ok
            gt1 = _gt_boxes(by_image[ids[start + every - 1]])
            for k, b, good in zip(keys, boxes, ok):
                if k in gt1:
                    ious.append(float(box_iou(b[None], gt1[k][None])[0, 0]) if good else 0.0)
                    lost += int(not good)
    return {
        "ms_per_box_frame": 1000 * seconds / max(box_frames, 1),
        "mean_iou": float(np.mean(ious)) if ious else 0.0,
        "lost": lost / max(len(ious), 1),
        "boxes": len(ious),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare box trackers (cost per box per frame on one core, IoU after tracking).",
        epilog="example: python -m bench.video_trackers --test build/video/test --sequences 2 --every 5",
    )
    parser.add_argument("--test", type=Path, default=Path("build/video/test"))
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument(
        "--every", type=int, default=5, help="re-initialise from the ground truth every N frames"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    import cv2

    from video.dataset import load_split
    from video.tracking import FlowTracker, OpenCVBoxTracker, opencv_tracker_factories

    cv2.setNumThreads(1)
    split = load_split(args.test)
    candidates = {"FlowTracker (ours, LK 4x4)": FlowTracker}
    candidates["FlowTracker (ours, LK 4x4 + forward-backward check)"] = lambda: FlowTracker(
        forward_backward=True
    )  # type: ignore
    for name, factory in opencv_tracker_factories().items():
        candidates[f"OpenCV {name}"] = lambda f=factory: OpenCVBoxTracker(f)  # type: ignore
    print(
        f"OpenCV {cv2.__version__}; {args.sequences} sequences, re-init every {args.every} frames, 1 thread\n"
    )
    print("| tracker | ms per box per frame | mean IoU at frame k-1 | lost |")
    print("|---|---:|---:|---:|")
    for name, factory in candidates.items():
        r = measure(factory, split, args.sequences, args.every)
        print(f"| {name} | {r['ms_per_box_frame']:.3f} | {r['mean_iou']:.3f} | {100 * r['lost']:.1f} % |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
