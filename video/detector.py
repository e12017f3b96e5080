"""A video detector on onnxruntime: uint8 frames in, boxes/scores/labels out (numpy decode + class-wise NMS).

The graphs (training/detection_models.py) already apply the sigmoid, the 3x3 peak test and the box decoding,
so decoding here is a threshold, a top-k and NMS. NMS is numpy rather than cv2.dnn.NMSBoxes: class-wise with
one sort, and it keeps this module importable where only numpy and onnxruntime are installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from video.providers import usable_providers

logger = logging.getLogger(__name__)

DEFAULT_SCORE_THRESHOLD = 0.05
DEFAULT_NMS_IOU = 0.6
DEFAULT_MAX_DETECTIONS = 50


class DetectorError(ValueError):
    """A detector that cannot be loaded: no card or model file, not a detector's card, a sha256 that does
    not match, no usable provider. One line that says which."""


def _card_field(card: Any, card_path: Path, *keys: str) -> Any:
    """`card[keys[0]][keys[1]]...`, or DetectorError naming the first key that is missing."""
    value = card
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise DetectorError(
                f"{card_path} has no {'.'.join(keys[: depth + 1])}: not a video detector's card "
                "(models/video-fmnist has one)"
            )
        value = value[key]
    return value


@dataclass
class Detections:
    """Boxes x1,y1,x2,y2 in pixels float32 [N,4], scores float32 [N], labels int64 [N] (0..9)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    sources: List[str] = field(
        default_factory=list
    )  # per box: edge / tracked / fused / cloud (fusion output)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), [])

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, keep: np.ndarray) -> Detections:
        srcs = [self.sources[i] for i in np.asarray(keep).reshape(-1)] if self.sources else []
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep], srcs)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of x1,y1,x2,y2 boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    return (inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)).astype(np.float32)


def nms_classwise(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS within each class, highest score first."""
    if len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    # offsetting each class far apart makes one NMS pass class-wise (boxes of two classes never overlap)
    shifted = boxes + (labels.astype(np.float32) * 4096.0)[:, None]
    order = np.argsort(-scores, kind="stable")
    keep: List[int] = []
    while len(order):
        i = int(order[0])
        keep.append(i)
        if len(order) == 1:
            break
        overlaps = box_iou(shifted[i : i + 1], shifted[order[1:]])[0]
        order = order[1:][overlaps <= iou]
    return np.array(keep, dtype=np.int64)


def decode(
    peaks: np.ndarray,
    boxes: np.ndarray,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    nms_iou: float = DEFAULT_NMS_IOU,
    max_detections: int = DEFAULT_MAX_DETECTIONS,
    image_size: Optional[List[int]] = None,
) -> Detections:
    """One image's graph outputs (peaks [C,h,w], boxes [4,h,w]) -> Detections."""
    num_classes = peaks.shape[0]
    flat = peaks.reshape(num_classes, -1)
    cls, cell = np.nonzero(flat >= score_threshold)
    if len(cls) == 0:
        return Detections.empty()
    scores = flat[cls, cell]
    if len(scores) > 4 * max_detections:
        top = np.argpartition(-scores, 4 * max_detections)[: 4 * max_detections]
        cls, cell, scores = cls[top], cell[top], scores[top]
    out_boxes = boxes.reshape(4, -1)[:, cell].T.astype(np.float32)
    if image_size is not None:
        h, w = image_size
        out_boxes[:, [0, 2]] = np.clip(out_boxes[:, [0, 2]], 0, w)
        out_boxes[:, [1, 3]] = np.clip(out_boxes[:, [1, 3]], 0, h)
    keep = nms_classwise(out_boxes, scores, cls, nms_iou)[:max_detections]
    return Detections(out_boxes[keep], scores[keep].astype(np.float32), cls[keep].astype(np.int64), [])


class Detector:
    """An exported detector (`edge.onnx` or `cloud.onnx` of models/video-fmnist) on onnxruntime.

    `threads` is the intra-op thread count (1 = one core, what the device budget is measured on)."""

    def __init__(
        self,
        path: Path,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        nms_iou: float = DEFAULT_NMS_IOU,
        max_detections: int = DEFAULT_MAX_DETECTIONS,
        threads: int = 1,
        providers: Optional[List[str]] = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No busy-waiting after a run: between frames the tracker, the fusion and MQTT need the core.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            usable = usable_providers(providers, ort.get_available_providers())
        except ValueError as exc:
            raise DetectorError(f"detector {path}: {exc}") from None
        self.session = ort.InferenceSession(str(path), options, providers=usable)
        self.input_name = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        self.input_hw = [int(shape[2]), int(shape[3])]
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.max_detections = max_detections

    @classmethod
    def from_card(cls, model_dir: Path, kind: str, threads: int = 1, **overrides: Any) -> Detector:
        """`kind` (edge or cloud) of a model directory, with the card's decoding parameters.

        DetectorError when the directory, its card or the model file is missing, the card is not a video
        detector's (a classification model directory), or the file does not match the card's sha256."""
        model_dir = Path(model_dir)
        card_path = model_dir / "card.json"
        if not model_dir.is_dir():
            raise DetectorError(f"detector directory {model_dir} does not exist")
        try:
            card: Any = json.loads(card_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DetectorError(f"{model_dir} has no card.json: not a detector directory") from None
        except (OSError, ValueError) as exc:
            raise DetectorError(f"cannot read the detector card {card_path}: {exc}") from None
        entry = _card_field(card, card_path, "models", kind)
        params = {
            name: _card_field(card, card_path, "decoding", name)
            for name in ("score_threshold", "nms_iou", "max_detections")
        }
        params.update(overrides)
        path = model_dir / str(_card_field(card, card_path, "models", kind, "file"))
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DetectorError(f"cannot read the detector {path} named in {card_path}: {exc}") from None
        if "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise DetectorError(f"{path} does not match the sha256 in its card")
        return cls(path, threads=threads, **params)

    def detect_batch(self, frames: np.ndarray) -> List[Detections]:
        """uint8 [B,H,W] or [B,1,H,W] -> one Detections per frame (micro-batching on the cloud)."""
        batch = frames[:, None] if frames.ndim == 3 else frames
        if batch.dtype != np.uint8 or list(batch.shape[2:]) != self.input_hw:
            raise ValueError(
                f"frames must be uint8 [B,1,{self.input_hw[0]},{self.input_hw[1]}], got {batch.shape}"
            )
        peaks, boxes = self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})
        return [
            decode(p, b, self.score_threshold, self.nms_iou, self.max_detections, self.input_hw)
            for p, b in zip(peaks, boxes)
        ]

    def detect(self, frame: np.ndarray) -> Detections:
        """One uint8 [H,W] frame."""
        return self.detect_batch(frame[None])[0]
