"""Backing off offloading when the cloud stops being better than the edge on what is offloaded.

Issue 16 point 4. Under a shift of the inputs the edge grows unsure and offloads more, to a cloud model that
may have suffered more than the edge (measured: Gaussian noise σ 0.15 took the committed cloud model to 29.6 %
against the edge's 38.3 %, while meanet offloaded 85 %). Labels are not there to tell; what the device sees
for each answered offload is its own answer's confidence and the cloud's. Each model's max-softmax is its own
estimate of its accuracy, so over the recent answered offloads

    advantage = mean(cloud's max-softmax) − mean(edge's max-softmax), the same samples

estimates how much the cloud adds on exactly what is sent to it (`python -m bench.suite_offline` compares it
with the real difference on the corruption suite). Below `back_off_below` (with at least `min_answers` in
the window) the watch backs off: an offload decision is answered at the edge instead (exit stage `shed`,
counted here), except for a `probe` share that still goes, so the watch keeps measuring and resumes once
the advantage is back above `resume_above` (hysteresis: no flapping around one threshold).
"""

from __future__ import annotations

import random
import threading
from collections import deque
from typing import Any, Deque, Dict, Optional, Tuple

DEFAULT_WINDOW = 200
DEFAULT_MIN_ANSWERS = 50
DEFAULT_BACK_OFF_BELOW = 0.0
DEFAULT_RESUME_ABOVE = 0.02
DEFAULT_PROBE = 0.1


class CloudWatch:
    """Thread-safe: `answered` comes from the link thread, `admit` from the inference thread."""

    def __init__(
        self,
        window: int = DEFAULT_WINDOW,
        min_answers: int = DEFAULT_MIN_ANSWERS,
        back_off_below: float = DEFAULT_BACK_OFF_BELOW,
        resume_above: float = DEFAULT_RESUME_ABOVE,
        probe: float = DEFAULT_PROBE,
        seed: Optional[int] = 0,
    ) -> None:
        if not 1 <= min_answers <= window:
            raise ValueError(f"need 1 <= min_answers <= window, got {min_answers} and {window}")
        if resume_above < back_off_below:
            raise ValueError("resume_above must be >= back_off_below (hysteresis)")
        if not 0.0 < probe <= 1.0:
            raise ValueError(
                f"probe must be in (0, 1]: a watch that never offloads never learns, got {probe}"
            )
        self.window = window
        self.min_answers = min_answers
        self.back_off_below = back_off_below
        self.resume_above = resume_above
        self.probe = probe
        self._pairs: Deque[Tuple[float, float]] = deque(maxlen=window)
        self._sum_edge = 0.0
        self._sum_cloud = 0.0
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.backed_off = False
        self.back_offs = 0  # times it started backing off
        self.kept_at_edge = 0  # offload decisions it answered at the edge
        self.probes = 0  # offload decisions it let through while backed off

    def answered(self, edge_confidence: float, cloud_confidence: float) -> None:
        """One answered offload: the edge's max-softmax for its own answer, the cloud's for its."""
        with self._lock:
            if len(self._pairs) == self.window:
                old_edge, old_cloud = self._pairs[0]
                self._sum_edge -= old_edge
                self._sum_cloud -= old_cloud
            self._pairs.append((edge_confidence, cloud_confidence))
            self._sum_edge += edge_confidence
            self._sum_cloud += cloud_confidence
            advantage = self._advantage()
            if advantage is None:
                return
            if not self.backed_off and advantage < self.back_off_below:
                self.backed_off = True
                self.back_offs += 1
            elif self.backed_off and advantage > self.resume_above:
                self.backed_off = False

    def admit(self) -> bool:
        """May this offload decision go to the cloud? (False: answer it at the edge, labelled.)"""
        with self._lock:
            if not self.backed_off:
                return True
            if self._random.random() < self.probe:
                self.probes += 1
                return True
            self.kept_at_edge += 1
            return False

    def _advantage(self) -> Optional[float]:
        n = len(self._pairs)
        return None if n < self.min_answers else (self._sum_cloud - self._sum_edge) / n

    def report(self) -> Dict[str, Any]:
        with self._lock:
            advantage = self._advantage()
            return {
                "backed_off": self.backed_off,
                "advantage": None if advantage is None else round(advantage, 4),
                "answers_in_window": len(self._pairs),
                "back_offs": self.back_offs,
                "kept_at_edge": self.kept_at_edge,
                "probes": self.probes,
                "back_off_below": self.back_off_below,
                "resume_above": self.resume_above,
            }
