"""What a cloud worker computes for a batch, and the reply each request gets.

A task owns its model, the topic kind it serves and its reply format; the worker owns everything else (the
subscription, the queue, deadlines, acknowledgements). `Classify` answers the classification cascade's
offloads with the cloud block's logits (the device applies `device_agent.rule.softmax`, the one definition);
`Detect` answers REACT's video frames with the cloud detector's boxes (`video.detector`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cloud_worker.model import CloudSession, ModelError
from protocol.codec import (
    CONTENT_TYPE_DETECTIONS,
    CONTENT_TYPE_REPLY,
    DetectionReply,
    OffloadReply,
    OffloadRequest,
    encode_detections,
    encode_reply,
)


@dataclass
class Served:
    """How a request was served, the same for every task."""

    cloud_ms: float
    worker_id: str
    cloud_j: Optional[float]
    energy_source: str
    extra: Dict[str, Any] = field(default_factory=dict)


class Classify:
    """The cloud block of the classification cascade: uint8 images in, logits out (the device applies the
    softmax); any other single-input classifier too, e.g. the fault model's int16 vibration windows."""

    topic_kind = "offload"
    reply_content_type = CONTENT_TYPE_REPLY

    def __init__(self, session: CloudSession) -> None:
        self.session = session
        self.path = session.path
        self.input_shape: Tuple[int, ...] = session.input_shape
        self.input_dtype = session.input_dtype
        self.sample_bytes = session.sample_bytes

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        self.session.warm_up(batch_sizes)

    def run(self, images: np.ndarray) -> np.ndarray:
        """Logits [N, classes] of a batch (the device turns them into probabilities, its own way)."""
        return self.session.logits(images)

    def reply(self, request: OffloadRequest, logits: np.ndarray, i: int, served: Served) -> bytes:
        return encode_reply(
            OffloadReply(
                run_id=request.run_id,
                device_id=request.device_id,
                seq=request.seq,
                prediction=int(logits[i].argmax()),
                logits=logits[i],
                cloud_ms=served.cloud_ms,
                worker_id=served.worker_id,
                cloud_j=served.cloud_j,
                energy_source=served.energy_source,
                extra=served.extra,
            )
        )


class Detect:
    """The cloud detector of REACT: uint8 frames [1, H, W] in, boxes, scores and labels out. ModelError
    when `model_dir` is not a usable detector directory (see `video.detector.Detector.from_card`)."""

    topic_kind = "frames"
    reply_content_type = CONTENT_TYPE_DETECTIONS

    def __init__(self, model_dir: Path, threads: Optional[int] = None, providers: Sequence[str] = ()) -> None:
        from video.detector import Detector, DetectorError

        try:
            self.detector = Detector.from_card(
                Path(model_dir), "cloud", threads=threads or 1, providers=list(providers) or None
            )
        except DetectorError as exc:
            raise ModelError(str(exc)) from None
        self.path = Path(model_dir)
        height, width = self.detector.input_hw
        self.input_shape: Tuple[int, ...] = (1, height, width)
        self.input_dtype = np.dtype(np.uint8)
        self.sample_bytes = height * width

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        for n in batch_sizes:
            self.run(np.zeros((n, *self.input_shape), dtype=np.uint8))

    def run(self, images: np.ndarray) -> List[Any]:
        return self.detector.detect_batch(images)

    def reply(self, request: OffloadRequest, detections: List[Any], i: int, served: Served) -> bytes:
        d = detections[i]
        return encode_detections(
            DetectionReply(
                run_id=request.run_id,
                device_id=request.device_id,
                seq=request.seq,
                boxes=d.boxes,
                scores=d.scores,
                labels=d.labels,
                cloud_ms=served.cloud_ms,
                worker_id=served.worker_id,
                cloud_j=served.cloud_j,
                energy_source=served.energy_source,
                extra=served.extra,
            )
        )


TASKS = ("classify", "detect")


def make_task(name: str, model_path: Path, providers: Sequence[str], threads: Optional[int]) -> Any:
    """The task a worker serves: `classify` (the cascade's cloud block) or `detect` (REACT's detector)."""
    if name == "classify":
        return Classify(CloudSession(model_path, providers, threads))
    if name == "detect":
        return Detect(model_path, threads, providers)
    raise ValueError(f"unknown cloud task {name!r}; known: {', '.join(TASKS)}")
