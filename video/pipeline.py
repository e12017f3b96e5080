"""The REACT device loop: detector every k frames, tracker in between, late cloud answers carried forward.

Clock-free: the caller feeds frames with their indices (`process`), asks whether to offload the frame it just
processed (`want_offload` / `mark_sent`), and hands in cloud answers when they arrive (`on_cloud_answer`); an
answer is applied while processing the next frame. The agent drives it on the real clock, the offline
simulation (bench/video_offline.py) on a simulated one.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Tuple

import numpy as np

from video.detector import Detections
from video.fusion import FrameOutput, FusionConfig, ReactFusion
from video.tracking import FlowTracker, forward_boxes

logger = logging.getLogger(__name__)

DetectFn = Callable[[int, np.ndarray], Detections]  # (frame index, uint8 [H,W] frame) -> detections


@dataclass(frozen=True)
class LoopConfig:
    detect_every: int = 5  # k: the edge detector runs on frames with index % k == 0
    cloud_every: Optional[int] = None  # m: offload every m-th frame; None: whenever the last answer is back
    forward_step: int = 2  # carry cloud boxes forward over every 2nd buffered frame
    max_buffer: int = 32  # frames kept for carrying answers forward
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def __post_init__(self) -> None:
        if self.detect_every < 1 or (self.cloud_every is not None and self.cloud_every < 1):
            raise ValueError("detect_every and cloud_every must be >= 1")
        if self.forward_step < 1 or self.max_buffer < 2:
            raise ValueError("forward_step >= 1 and max_buffer >= 2")


class _CloudSide:
    """What both loops do with the cloud: which frame to send, and the answers waiting to be applied."""

    config: LoopConfig

    def __init__(self) -> None:
        self.in_flight: Optional[int] = None
        self.pending: List[Tuple[int, Detections]] = []
        self.ran_detector = False  # whether the edge detector ran on the frame processed last

    def want_offload(self, index: int) -> bool:
        """Should the frame just processed go to the cloud?"""
        if self.config.cloud_every is not None:
            return index % self.config.cloud_every == 0
        return self.in_flight is None

    def mark_sent(self, index: int) -> None:
        self.in_flight = index

    def on_cloud_answer(self, sent_index: int, dets: Detections) -> None:
        """A cloud answer for frame `sent_index`; fused while processing the next frame."""
        self.pending.append((sent_index, dets))
        if self.in_flight == sent_index:
            self.in_flight = None

    def on_cloud_lost(self, sent_index: int) -> None:
        """The offload of `sent_index` missed its deadline: send another."""
        if self.in_flight == sent_index:
            self.in_flight = None


class DeviceLoop(_CloudSide):
    def __init__(
        self, detect: DetectFn, tracker: Optional[FlowTracker] = None, config: Optional[LoopConfig] = None
    ):
        self.detect = detect
        self.tracker = tracker or FlowTracker()
        self.config = config or LoopConfig()
        self.fusion = ReactFusion(self.config.fusion)
        self.buffer: Deque[Tuple[int, np.ndarray]] = deque(maxlen=self.config.max_buffer)
        super().__init__()
        self.answers_applied = 0
        self.answers_too_old = 0

    def process(self, index: int, frame: np.ndarray) -> FrameOutput:
        """Edge detector or tracker on this frame, then any cloud answer that came in; the fused output."""
        previous = self.buffer[-1] if self.buffer else None
        self.buffer.append((index, frame))
        self.ran_detector = False
        if index % self.config.detect_every == 0 or previous is None:
            self.ran_detector = True
            self.fusion.on_edge(index, self.detect(index, frame))
        elif len(self.fusion.tracks):
            boxes, ok = self.tracker.track(previous[1], frame, self.fusion.boxes())
            self.fusion.on_tracked(index, boxes, ok)
        for sent, dets in self.pending:
            self.fusion.on_cloud(index, self._carry_forward(sent, dets), age_frames=index - sent)
            self.answers_applied += 1
        self.pending = []
        return self.fusion.output(index)

    def _carry_forward(self, sent: int, dets: Detections) -> Detections:
        frames = [f for i, f in self.buffer if i >= sent]
        if not self.buffer or self.buffer[0][0] > sent:
            self.answers_too_old += 1  # older than the buffer: carried from the oldest frame still held
            logger.debug("cloud answer for frame %d is older than the buffer", sent)
        boxes, _ok = forward_boxes(frames, dets.boxes, self.tracker, self.config.forward_step)
        return Detections(boxes, dets.scores, dets.labels, [])


class CloudOnlyLoop(_CloudSide):
    """cloud-only: no detector runs on the device. The latest cloud answer is carried forward over the
    frames buffered since it was sent (like REACT does) and then tracked frame by frame until the next one
    comes: the "tracked" variant, the stronger of the two cloud-only baselines (bench/video_offline.py
    measures both). The same interface as `DeviceLoop`."""

    def __init__(self, tracker: Optional[FlowTracker] = None, config: Optional[LoopConfig] = None) -> None:
        self.tracker = tracker or FlowTracker()
        self.config = config or LoopConfig()
        self.buffer: Deque[Tuple[int, np.ndarray]] = deque(maxlen=self.config.max_buffer)
        self.held = Detections.empty()
        super().__init__()
        self.answers_applied = 0

    def process(self, index: int, frame: np.ndarray) -> FrameOutput:
        previous = self.buffer[-1] if self.buffer else None
        self.buffer.append((index, frame))
        if self.pending:
            sent, answer = max(self.pending, key=lambda p: p[0])  # the newest answer wins
            self.pending = []
            frames = [f for i, f in self.buffer if i >= sent]
            boxes, _ok = forward_boxes(frames, answer.boxes, self.tracker, self.config.forward_step)
            self.held = Detections(boxes, answer.scores, answer.labels, ["cloud"] * len(answer))
            self.answers_applied += 1
        elif previous is not None and len(self.held):
            boxes, _ok = self.tracker.track(previous[1], frame, self.held.boxes)
            self.held = Detections(boxes, self.held.scores, self.held.labels, ["cloud"] * len(self.held))
        return FrameOutput(index, self.held, "cloud" if len(self.held) else "none")
