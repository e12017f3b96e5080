"""Following the better tier under drift: backing off offloading when the cloud stops being better than the
edge on what is offloaded, and sending the cloud everything while the inputs drift and it is the better one.

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

The other direction: thresholds calibrated on clean data keep most samples at the edge, so under drift a
cascade whose cloud copes better than its edge (a cloud trained on corruptions: 1-7 pp better on the suite)
trails the cloud by up to 0.6 pp. While the device's drift monitor flags its inputs and the advantage is
above `escalate_above`, the watch escalates: every sample goes to the cloud (`escalates`), until the drift is
over or the advantage, now measured on everything sent, falls below `back_off_below`. Without a drift flag it
never escalates, so clean traffic costs what the calibration says.
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
DEFAULT_ESCALATE_ABOVE = 0.05


class CloudWatch:
    """Thread-safe: `answered` comes from the link thread, `admit` from the inference thread."""

    def __init__(
        self,
        window: int = DEFAULT_WINDOW,
        min_answers: int = DEFAULT_MIN_ANSWERS,
        back_off_below: float = DEFAULT_BACK_OFF_BELOW,
        resume_above: float = DEFAULT_RESUME_ABOVE,
        probe: float = DEFAULT_PROBE,
        escalate_above: float = DEFAULT_ESCALATE_ABOVE,
        seed: Optional[int] = 0,
    ) -> None:
        if not 1 <= min_answers <= window:
            raise ValueError(f"need 1 <= min_answers <= window, got {min_answers} and {window}")
        if resume_above < back_off_below or escalate_above < back_off_below:
            raise ValueError("resume_above and escalate_above must be >= back_off_below (hysteresis)")
        if not 0.0 < probe <= 1.0:
            raise ValueError(
                f"probe must be in (0, 1]: a watch that never offloads never learns, got {probe}"
            )
        self.window = window
        self.min_answers = min_answers
        self.back_off_below = back_off_below
        self.resume_above = resume_above
        self.probe = probe
        self.escalate_above = escalate_above
        self._pairs: Deque[Tuple[float, float]] = deque(maxlen=window)
        self._sum_edge = 0.0
        self._sum_cloud = 0.0
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.backed_off = False
        self.back_offs = 0  # times it started backing off
        self.kept_at_edge = 0  # offload decisions it answered at the edge
        self.probes = 0  # offload decisions it let through while backed off
        self.escalated = False
        self.escalations = 0  # times it started escalating
        self.sent_by_escalation = 0  # edge exits it sent to the cloud instead

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
                self.escalated = False
            elif self.backed_off and advantage > self.resume_above:
                self.backed_off = False

    def escalates(self, drifting: bool) -> bool:
        """Should this sample, which the policy would answer at the edge, go to the cloud? True while the
        inputs drift (`drifting`: the device's drift monitor's verdict) and the cloud is the better tier."""
        with self._lock:
            if not drifting or self.backed_off:
                self.escalated = False
                return False
            if not self.escalated:
                advantage = self._advantage()
                if advantage is None or advantage <= self.escalate_above:
                    return False
                self.escalated = True
                self.escalations += 1
            self.sent_by_escalation += 1
            return True

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
                "escalated": self.escalated,
                "escalations": self.escalations,
                "sent_by_escalation": self.sent_by_escalation,
                "back_off_below": self.back_off_below,
                "resume_above": self.resume_above,
                "escalate_above": self.escalate_above,
            }
