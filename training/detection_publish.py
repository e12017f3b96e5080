"""Publish the video detectors: ONNX export (uint8 in), torch check, MACs, test mAP through the device's own
decoder (video.detector), one-core fps, card.json and MODEL_CARD.md."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from device_agent.sources import FASHION_MNIST_CLASSES
from training.detection import load_checkpoint
from training.detection_models import ExportWrapper
from training.export import OPSET, count_costs
from video.detector import DEFAULT_MAX_DETECTIONS, DEFAULT_NMS_IOU, DEFAULT_SCORE_THRESHOLD, Detector
from video.evaluate import coco_map

logger = logging.getLogger(__name__)

MAX_ABS_DIFF = 1e-3  # scores and pixel boxes (0..128); the peak mask may flip on exact ties only


def export_detector(model: torch.nn.Module, path: Path, size: int) -> Path:
    wrapper = ExportWrapper(model).eval()
    example = torch.randint(0, 256, (2, 1, size, size), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation (dynamo needs onnxscript)
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["peaks", "boxes"],
            dynamic_axes={"image": {0: "batch"}, "peaks": {0: "batch"}, "boxes": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(example)]
    got = sess.run(None, {"image": example.numpy()})
    diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
    if diff > MAX_ABS_DIFF:
        raise RuntimeError(f"{path.name}: onnxruntime differs from torch by {diff:.3g}")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate_detector(detector: Detector, test_root: Path, limit_sequences: Optional[int]) -> Dict[str, Any]:
    from video.dataset import load_split

    split = load_split(test_root)
    n = split.sequences if limit_sequences is None else min(limit_sequences, split.sequences)
    detections = {}
    for s in range(n):
        frames = split.frames(s)
        for start in range(0, len(frames), 32):
            batch = frames[start : start + 32]
            for iid, dets in zip(split.image_ids(s)[start : start + 32], detector.detect_batch(batch)):
                detections[iid] = dets
    result = coco_map(split.coco, detections)
    return {"map50": round(result.map50, 4), "map": round(result.map, 4), "frames": result.images}


def fps_one_core(detector: Detector, frames: np.ndarray, repeats: int = 200) -> float:
    """Frames per second of detect() (graph + decode + NMS), batch 1, on the session's thread count."""
    for f in frames[:10]:
        detector.detect(f)
    start = time.perf_counter()
    for i in range(repeats):
        detector.detect(frames[i % len(frames)])
    return repeats / (time.perf_counter() - start)


def publish(
    edge_ckpt: Path, cloud_ckpt: Path, test_root: Path, out: Path, train_command: str, limit: Optional[int]
) -> Dict[str, Any]:
    from video.dataset import load_split

    split = load_split(test_root)
    size = int(split.manifest["config"]["height"])
    sample_frames = split.frames(0)
    models: Dict[str, Any] = {}
    for kind, ckpt in (("edge", edge_ckpt), ("cloud", cloud_ckpt)):
        model, meta = load_checkpoint(ckpt)
        path = export_detector(model, out / f"{kind}.onnx", size)
        costs = count_costs(model, [torch.zeros(1, 1, size, size)])
        detector = Detector(path, threads=1)
        metrics = evaluate_detector(detector, test_root, limit)
        fps = fps_one_core(detector, sample_frames, repeats=300 if kind == "edge" else 60)
        models[kind] = {
            "file": path.name,
            "sha256": _sha256(path),
            "stride": int(model.stride),  # type: ignore[arg-type]
            "macs": costs["macs"],
            "params": costs["params"],
            "map50": metrics["map50"],
            "map": metrics["map"],
            "fps_one_core": round(fps, 1),
            "train": meta,
        }
        logger.info("%s: %s", kind, {k: v for k, v in models[kind].items() if k != "train"})
    card = {
        "schema": 1,
        "task": "video-detection",
        "dataset": "edgecascade synthetic Fashion-MNIST video (video/synth.py)",
        "classes": list(FASHION_MNIST_CLASSES),
        "category_ids": "label + 1 (COCO)",
        "input": {
            "name": "image",
            "shape": [1, size, size],
            "dtype": "uint8",
            "layout": "NCHW, batch dynamic",
        },
        "outputs": {
            "peaks": "[B,10,H/s,W/s] sigmoid score where a 3x3 local maximum, else 0",
            "boxes": "[B,4,H/s,W/s] x1,y1,x2,y2 in input pixels for the object centred in that cell",
        },
        "decoding": {
            "score_threshold": DEFAULT_SCORE_THRESHOLD,
            "nms_iou": DEFAULT_NMS_IOU,
            "nms": "class-wise, greedy",
            "max_detections": DEFAULT_MAX_DETECTIONS,
        },
        "evaluation": {
            "test_split": str(test_root),
            "test_manifest": {k: split.manifest[k] for k in ("seed", "sequences", "frames_per_sequence")},
            "evaluator": "pycocotools COCOeval bbox, maxDets 100, iscrowd objects ignored",
            "sequences_evaluated": limit or split.sequences,
        },
        "training_command": train_command,
        "models": models,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
