"""What a cloud worker computes for a batch, and the reply each request gets.

A task owns its model and its reply format; the worker owns everything else (the subscription, the queue,
deadlines, acknowledgements). `Classify` answers the classification cascade's offloads with the cloud
block's softmax (`device_agent.rule.softmax`, the one definition the device uses too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from cloud_worker.model import CloudSession
from device_agent.rule import softmax
from protocol.codec import CONTENT_TYPE_REPLY, OffloadReply, OffloadRequest, encode_reply


@dataclass
class Served:
    """How a request was served, the same for every task."""

    cloud_ms: float
    worker_id: str
    cloud_j: Optional[float]
    energy_source: str
    extra: Dict[str, Any] = field(default_factory=dict)


class Classify:
    """The cloud block of the classification cascade: uint8 images in, class probabilities out."""

    reply_content_type = CONTENT_TYPE_REPLY

    def __init__(self, session: CloudSession) -> None:
        self.session = session
        self.input_shape: Tuple[int, ...] = session.input_shape
        self.sample_bytes = session.sample_bytes

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        self.session.warm_up(batch_sizes)

    def run(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] of a uint8 batch."""
        return softmax(self.session.logits(images))

    def reply(self, request: OffloadRequest, probs: np.ndarray, i: int, served: Served) -> bytes:
        return encode_reply(
            OffloadReply(
                run_id=request.run_id,
                device_id=request.device_id,
                seq=request.seq,
                prediction=int(probs[i].argmax()),
                probs=probs[i],
                cloud_ms=served.cloud_ms,
                worker_id=served.worker_id,
                cloud_j=served.cloud_j,
                energy_source=served.energy_source,
                extra=served.extra,
            )
        )
