"""Offline REACT simulation on the test sequences: mAP of edge-only, edge + tracker, cloud-only and REACT
fusion for a sweep of cloud delays and k, the cloud's latency simulated as a delay in frames; device-loop fps
on one core.

    python -m bench.video_offline --models models/video-fmnist --test build/video/test \
        --json build/video/offline.json

The two detectors run once on every test frame (onnxruntime, one thread); each method then reads the
detections of the frames it would have run on. A frame sent to the cloud at frame s comes back at frame
s + ceil((delay_ms + cloud_ms) * fps / 1000) (at least the next frame), where cloud_ms is the cloud detector's
measured time per frame here. A new frame is sent whenever the previous answer is back. cloud-only (held)
shows the latest answer unchanged until the next; cloud-only (tracked) carries it forward like REACT does
and then tracks it frame by frame. Targets are printed with PASS/FAIL.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

logger = logging.getLogger(__name__)

DELAYS_MS = (0, 100, 300, 1000)


def _precompute(detector, split, sequences: int) -> Dict[int, List[Any]]:  # type: ignore[no-untyped-def]
    out = {}
    for s in range(sequences):
        frames = split.frames(s)
        dets = []
        for start in range(0, len(frames), 32):
            dets += detector.detect_batch(frames[start : start + 32])
        out[s] = dets
    return out


def _delay_frames(delay_ms: float, cloud_ms: float, fps: float) -> int:
    return max(1, math.ceil((delay_ms + cloud_ms) * fps / 1000.0 - 1e-9))


def run_react(split, s: int, edge, cloud, k: int, delay: int, use_cloud: bool, timing: Optional[list] = None):  # type: ignore[no-untyped-def]
    """Per-frame outputs of the device loop on sequence s (edge every k, cloud `delay` frames late)."""
    from video.pipeline import DeviceLoop, LoopConfig

    frames = split.frames(s)
    loop = DeviceLoop(lambda i, _f: edge[s][i], config=LoopConfig(detect_every=k))
    arrivals: Dict[int, List[int]] = {}
    outputs = []
    for t, frame in enumerate(frames):
        for sent in arrivals.pop(t, []):
            loop.on_cloud_answer(sent, cloud[s][sent])
        t0 = time.perf_counter()
        outputs.append(loop.process(t, frame).detections)
        if timing is not None:
            timing.append(time.perf_counter() - t0)
        if use_cloud and loop.want_offload(t):
            loop.mark_sent(t)
            arrivals.setdefault(t + delay, []).append(t)
    return outputs


def run_cloud_only(split, s: int, cloud, delay: int, tracked: bool):  # type: ignore[no-untyped-def]
    from video.detector import Detections
    from video.tracking import FlowTracker, forward_boxes

    frames = split.frames(s)
    tracker = FlowTracker()
    held = Detections.empty()
    outputs = []
    sent, arrive = 0, delay
    for t in range(len(frames)):
        if t == arrive:
            answer = cloud[s][sent]
            if tracked:
                boxes, _ = forward_boxes(list(frames[max(sent, t - 31) : t + 1]), answer.boxes, tracker)
                answer = Detections(boxes, answer.scores, answer.labels, [])
            held = answer
            sent, arrive = t, t + delay
        elif tracked and t and len(held):
            boxes, _ = tracker.track(frames[t - 1], frames[t], held.boxes)
            held = Detections(boxes, held.scores, held.labels, [])
        outputs.append(held)
    return outputs


def evaluate(split, sequences: int, per_seq: Dict[int, list]) -> Dict[str, float]:  # type: ignore[no-untyped-def]
    from video.evaluate import coco_map

    dets = {iid: d for s in range(sequences) for iid, d in zip(split.image_ids(s), per_seq[s])}
    r = coco_map(split.coco, dets)
    return {"map50": round(100 * r.map50, 2), "map": round(100 * r.map, 2)}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=Path("models/video-fmnist"))
    parser.add_argument("--test", type=Path, default=Path("build/video/test"))
    parser.add_argument("--sequences", type=int, help="first N test sequences (default: all)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="edge detector every k frames")
    parser.add_argument("--delays", type=float, nargs="+", default=list(DELAYS_MS), help="cloud delays, ms")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    import cv2

    from video.dataset import load_split
    from video.detector import Detector

    cv2.setNumThreads(1)
    split = load_split(args.test)
    n = args.sequences or split.sequences
    fps = split.fps
    edge_det = Detector.from_card(args.models, "edge", threads=1)
    cloud_det = Detector.from_card(args.models, "cloud", threads=1)
    sample = split.frames(0)
    timings: Dict[str, float] = {}
    for name, det in (("edge", edge_det), ("cloud", cloud_det)):
        for f in sample[:5]:
            det.detect(f)
        t0 = time.perf_counter()
        for f in sample[:100]:
            det.detect(f)
        timings[name] = 1000 * (time.perf_counter() - t0) / 100
    logger.info("detector ms per frame, 1 thread: %s", timings)
    edge = _precompute(edge_det, split, n)
    cloud = _precompute(cloud_det, split, n)
    rows: List[Dict[str, Any]] = []

    def add(method: str, delay_ms: Optional[float], k: Optional[int], per_seq: Dict[int, list]) -> None:
        row = {"method": method, "delay_ms": delay_ms, "k": k, **evaluate(split, n, per_seq)}
        rows.append(row)
        logger.info("%s", row)

    add("edge-only", None, 1, edge)
    add("cloud (fresh, no delay: upper bound)", None, None, cloud)
    for k in args.k:
        if k > 1:
            add(
                "edge + tracker",
                None,
                k,
                {s: run_react(split, s, edge, cloud, k, 1, False) for s in range(n)},
            )
    for delay_ms in args.delays:
        d = _delay_frames(delay_ms, timings["cloud"], fps)
        for tracked in (False, True):
            name = "cloud-only (tracked)" if tracked else "cloud-only (held)"
            add(name, delay_ms, None, {s: run_cloud_only(split, s, cloud, d, tracked) for s in range(n)})
        for k in args.k:
            add(
                "REACT fusion",
                delay_ms,
                k,
                {s: run_react(split, s, edge, cloud, k, d, True) for s in range(n)},
            )
    loop_times: list = []
    run_react(split, 0, edge, cloud, 5, _delay_frames(300, timings["cloud"], fps), True, loop_times)
    # the loop above reads precomputed detections: add the detector's own time on the frames it runs on
    loop_ms = 1000 * float(np.mean(loop_times)) + timings["edge"] / 5
    figures = {
        "edge_ms": round(timings["edge"], 3),
        "cloud_ms": round(timings["cloud"], 3),
        "edge_fps_one_core": round(1000 / timings["edge"], 1),
        "device_loop_ms_k5": round(loop_ms, 3),
        "device_loop_fps_k5": round(1000 / loop_ms, 1),
        "delay_frames": {str(dm): _delay_frames(dm, timings["cloud"], fps) for dm in args.delays},
    }
    print("| method | delay ms | k | mAP@0.5 | mAP@0.5:0.95 |\n|---|---:|---:|---:|---:|")
    for r in rows:
        dm = "—" if r["delay_ms"] is None else f"{r['delay_ms']:g}"
        print(f"| {r['method']} | {dm} | {r['k'] or '—'} | {r['map50']:.2f} | {r['map']:.2f} |")
    print("\n" + json.dumps(figures))
    targets = _targets(rows, figures)
    for line in targets:
        print(line)
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "figures": figures, "targets": targets}, indent=2) + "\n"
        )
    return 0


def _targets(rows: List[Dict[str, Any]], figures: Dict[str, Any]) -> List[str]:
    def get(method: str, delay: Optional[float], k: Optional[int]) -> float:
        return next(
            r["map50"] for r in rows if r["method"] == method and r["delay_ms"] == delay and r["k"] == k
        )

    out = []
    edge_only = get("edge-only", None, 1)
    for k in sorted({r["k"] for r in rows if r["method"] == "REACT fusion"}):
        at300 = get("REACT fusion", 300, k)
        best = max(edge_only, get("cloud-only (held)", 300, None), get("cloud-only (tracked)", 300, None))
        verdict = "PASS" if at300 >= best + 5 else "FAIL"
        out.append(f"k={k}: REACT@300ms {at300:.2f} >= max(edge-only, cloud-only) {best:.2f} + 5: {verdict}")
        worst = min(r["map50"] for r in rows if r["method"] == "REACT fusion" and r["k"] == k)
        verdict = "PASS" if worst >= edge_only else "FAIL"
        out.append(f"k={k}: REACT at every delay (min {worst:.2f}) >= edge-only {edge_only:.2f}: {verdict}")
    out.append(
        f"edge detector {figures['edge_fps_one_core']} fps on one core >= 30: "
        f"{'PASS' if figures['edge_fps_one_core'] >= 30 else 'FAIL'}"
    )
    out.append(
        f"device loop (k=5) {figures['device_loop_fps_k5']} fps on one core >= 30: "
        f"{'PASS' if figures['device_loop_fps_k5'] >= 30 else 'FAIL'}"
    )
    return out


if __name__ == "__main__":
    sys.exit(main())
