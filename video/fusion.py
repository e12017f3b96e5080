"""REACT's edge-cloud fusion as a pure state machine over frame indices (no clock, no I/O, no tracker inside).

The state is a set of tracks (box, class, score). Events, in the order they happen on the device:

- `on_edge(frame, dets)`: fresh edge detections. Matched to the tracks by IoU (pairs below `iou_threshold`
  discarded, the assignment solved with `scipy.optimize.linear_sum_assignment`). A matched track takes the
  edge box; it keeps the class and score the cloud gave it, if any (source `fused`), else the edge's (source
  `edge`). Unmatched detections become tracks; unmatched tracks are no longer confirmed and from this frame
  decay (score x `decay` per frame) until dropped below `drop_below`, unless a later edge run or cloud
  answer confirms them again.
- `on_tracked(frame, boxes, ok)`: the tracker moved the tracks' boxes (in `boxes()` order); edge tracks
  become `tracked`; a box the tracker lost is no longer confirmed.
- `on_cloud(frame, dets)`: a cloud answer, already carried forward to `frame` (video.tracking.forward_boxes).
  Matched the same way: a matched pair keeps the fresh edge/tracked box and takes the cloud's class and
  score (source `fused`); unmatched cloud boxes are added (source `cloud`).

`output(frame)` yields the frame's Detections with a source per box, and the frame's own source: `fused`
when a cloud answer was merged at this frame, else `edge` when the detector ran, else `tracked`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from video.detector import Detections, box_iou

logger = logging.getLogger(__name__)

SOURCES = ("edge", "tracked", "fused", "cloud")


@dataclass(frozen=True)
class FusionConfig:
    iou_threshold: float = 0.5
    decay: float = 0.8  # per frame, for tracks nobody confirms
    drop_below: float = 0.05
    # beyond the paper: an unmatched cloud box is as stale as its answer, so its score is scaled by
    # cloud_age_decay ** age_frames; a track the cloud answer does not confirm is scaled by cloud_miss_factor
    cloud_age_decay: float = 0.95
    cloud_miss_factor: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.iou_threshold <= 1 or not 0 < self.decay <= 1 or self.drop_below < 0:
            raise ValueError("need 0 < iou_threshold <= 1, 0 < decay <= 1, drop_below >= 0")
        if not 0 < self.cloud_age_decay <= 1 or not 0 < self.cloud_miss_factor <= 1:
            raise ValueError("need 0 < cloud_age_decay <= 1 and 0 < cloud_miss_factor <= 1")


@dataclass
class _Track:
    box: np.ndarray
    label: int
    score: float
    source: str
    stale_since: Optional[int] = None  # None: confirmed by the latest edge run / cloud answer
    from_cloud: bool = False  # label and score are the cloud's

    def score_at(self, frame: int, decay: float) -> float:
        if self.stale_since is None:
            return self.score
        return self.score * decay ** (frame - self.stale_since + 1)


@dataclass
class FrameOutput:
    frame: int
    detections: Detections
    source: str


def match(a: np.ndarray, b: np.ndarray, iou_threshold: float) -> List[Tuple[int, int]]:
    """Pairs (i, j) of an IoU-maximising one-to-one assignment, pairs below the threshold discarded."""
    if len(a) == 0 or len(b) == 0:
        return []
    from scipy.optimize import linear_sum_assignment

    iou = box_iou(a, b)
    iou[iou < iou_threshold] = 0.0
    rows, cols = linear_sum_assignment(-iou)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if iou[i, j] >= iou_threshold]


class ReactFusion:
    def __init__(self, config: Optional[FusionConfig] = None) -> None:
        self.config = config or FusionConfig()
        self.tracks: List[_Track] = []
        self._last_event: Tuple[int, str] = (-1, "tracked")

    def boxes(self) -> np.ndarray:
        """The tracks' boxes [N,4], the order `on_tracked` expects them back in."""
        if not self.tracks:
            return np.zeros((0, 4), dtype=np.float32)
        return np.stack([t.box for t in self.tracks]).astype(np.float32)

    def _note(self, frame: int, source: str) -> None:
        previous_frame, previous = self._last_event
        if previous_frame == frame and previous == "fused":
            return
        self._last_event = (frame, source)

    def _prune(self, frame: int) -> None:
        c = self.config
        self.tracks = [t for t in self.tracks if t.score_at(frame, c.decay) >= c.drop_below]

    def on_edge(self, frame: int, dets: Detections) -> None:
        c = self.config
        pairs = match(dets.boxes, self.boxes(), c.iou_threshold)
        matched_tracks = {j for _, j in pairs}
        matched_dets = {i for i, _ in pairs}
        for i, j in pairs:
            t = self.tracks[j]
            t.box = dets.boxes[i].astype(np.float32).copy()
            t.stale_since = None
            if t.from_cloud:
                t.source = "fused"
            else:
                t.label, t.score, t.source = int(dets.labels[i]), float(dets.scores[i]), "edge"
        fresh = [self.tracks[j] for j in sorted(matched_tracks)]
        for i in range(len(dets)):
            if i not in matched_dets:
                fresh.append(
                    _Track(
                        dets.boxes[i].astype(np.float32).copy(),
                        int(dets.labels[i]),
                        float(dets.scores[i]),
                        "edge",
                    )
                )
        fresh_boxes = np.stack([t.box for t in fresh]) if fresh else np.zeros((0, 4), np.float32)
        held = []
        for j, t in enumerate(self.tracks):
            if j in matched_tracks:
                continue
            # a held box that overlaps a fresh one is the same object: the fresh one replaces it
            if len(fresh_boxes) and box_iou(t.box[None], fresh_boxes).max() >= c.iou_threshold:
                continue
            if t.stale_since is None:
                t.stale_since = frame
            held.append(t)
        self.tracks = fresh + held
        self._prune(frame)
        self._note(frame, "edge")

    def on_tracked(self, frame: int, boxes: np.ndarray, ok: np.ndarray) -> None:
        if len(boxes) != len(self.tracks):
            raise ValueError(f"tracker returned {len(boxes)} boxes for {len(self.tracks)} tracks")
        for t, box, good in zip(self.tracks, boxes, ok):
            t.box = np.asarray(box, dtype=np.float32).copy()
            if t.source == "edge":
                t.source = "tracked"
            if not good and t.stale_since is None:
                t.stale_since = frame
        self._prune(frame)
        self._note(frame, "tracked")

    def on_cloud(self, frame: int, dets: Detections, age_frames: int = 0) -> None:
        """`age_frames`: how many frames after the cloud's own frame the answer is applied."""
        c = self.config
        pairs = match(dets.boxes, self.boxes(), c.iou_threshold)
        matched_dets = {i for i, _ in pairs}
        matched_tracks = {j for _, j in pairs}
        for j, t in enumerate(self.tracks):
            if j not in matched_tracks and not t.from_cloud:
                t.score *= c.cloud_miss_factor
        for i, j in pairs:
            t = self.tracks[j]
            t.label, t.score, t.source = int(dets.labels[i]), float(dets.scores[i]), "fused"
            t.stale_since, t.from_cloud = None, True
        for i in range(len(dets)):
            if i not in matched_dets:
                self.tracks.append(
                    _Track(
                        dets.boxes[i].astype(np.float32).copy(),
                        int(dets.labels[i]),
                        float(dets.scores[i]) * c.cloud_age_decay ** max(age_frames, 0),
                        "cloud",
                        from_cloud=True,
                    )
                )
        self._prune(frame)
        self._last_event = (frame, "fused")

    def output(self, frame: int) -> FrameOutput:
        self._prune(frame)
        decay = self.config.decay
        if not self.tracks:
            dets = Detections.empty()
        else:
            scores = np.array([t.score_at(frame, decay) for t in self.tracks], dtype=np.float32)
            order = np.argsort(-scores, kind="stable")
            dets = Detections(
                np.stack([self.tracks[i].box for i in order]).astype(np.float32),
                scores[order],
                np.array([self.tracks[i].label for i in order], dtype=np.int64),
                [self.tracks[i].source for i in order],
            )
        event_frame, source = self._last_event
        return FrameOutput(frame, dets, source if event_frame == frame else "tracked")
