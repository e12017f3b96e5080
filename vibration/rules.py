"""When a tier answers a window itself and when it passes the window up: HI's rule and the cost-sensitive
two-threshold rule (device-side: numpy only).

- HI (Moothedath, Champati, Gross, arXiv 2304.00891): answer locally when max-softmax ≥ θ, else offload.
- Two thresholds (Moothedath et al., "Inference Offloading for Cost-Sensitive Binary Classification at the
  Edge", arXiv 2509.15674, whose online learner is H2T2): on the local model's fault probability
  p = 1 - P(healthy), decide "no fault" locally when p ≤ θ_low, "fault" locally when p ≥ θ_high, offload
  between. For a calibrated model the Bayes-optimal pair is closed-form in the costs (`from_costs`):
  a miss costs c_fn, a false alarm c_fp, an offload β (the remote answer taken as right):
  θ_low = min(β / c_fn, c_fp / (c_fp + c_fn)), θ_high = max(1 - β / c_fp, c_fp / (c_fp + c_fn)).
  Our models are not calibrated, so `fit` picks the pair that minimises the same cost empirically on the
  validation split (the offline optimum H2T2's online learner converges to; the online learner itself is not
  implemented here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

HEALTHY = 0  # class index of "no fault" (vibration.simulate.CONDITIONS)


@dataclass(frozen=True)
class TierDecision:
    offload: bool
    prediction: int  # the local answer (also kept when offloading: the fallback if the next tier is gone)
    confidence: float  # max-softmax
    p_fault: float


def _local_answer(probs: np.ndarray) -> Tuple[int, float, float]:
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    return int(probs.argmax()), float(probs.max()), float(1.0 - probs[HEALTHY])


@dataclass(frozen=True)
class FixedRule:
    """Always offload (`offload`) or never; a local answer is the likeliest class."""

    offload: bool
    name: str = "fixed"

    def decide(self, probs: np.ndarray) -> TierDecision:
        prediction, confidence, p_fault = _local_answer(probs)
        return TierDecision(self.offload, prediction, confidence, p_fault)


@dataclass(frozen=True)
class HiRule:
    """Answer locally when max-softmax ≥ theta."""

    theta: float
    name: str = "hi"

    def __post_init__(self) -> None:
        if not 0.0 <= self.theta <= 1.0:
            raise ValueError(f"theta must be in [0, 1], got {self.theta!r}")

    def decide(self, probs: np.ndarray) -> TierDecision:
        prediction, confidence, p_fault = _local_answer(probs)
        return TierDecision(confidence < self.theta, prediction, confidence, p_fault)


@dataclass(frozen=True)
class TwoThresholdRule:
    """Answer "no fault" when p_fault ≤ low, "fault" (the likeliest fault class) when ≥ high, else offload."""

    low: float
    high: float
    name: str = "two-threshold"

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"want 0 <= low <= high <= 1, got low={self.low!r} high={self.high!r}")

    @classmethod
    def from_costs(cls, miss_cost: float, false_alarm_cost: float, offload_cost: float) -> TwoThresholdRule:
        """The Bayes-optimal pair for a calibrated local model (arXiv 2509.15674, sec. 3)."""
        if min(miss_cost, false_alarm_cost) <= 0 or offload_cost < 0:
            raise ValueError("costs must be > 0 (the offload's >= 0)")
        balance = false_alarm_cost / (false_alarm_cost + miss_cost)
        low = min(offload_cost / miss_cost, balance)
        high = max(1.0 - offload_cost / false_alarm_cost, balance)
        return cls(float(low), float(high))

    def decide(self, probs: np.ndarray) -> TierDecision:
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        prediction, confidence, p_fault = _local_answer(probs)
        if p_fault <= self.low:
            return TierDecision(False, HEALTHY, confidence, p_fault)
        if p_fault >= self.high:
            faults = probs.copy()
            faults[HEALTHY] = -1.0
            return TierDecision(False, int(faults.argmax()), confidence, p_fault)
        return TierDecision(True, prediction, confidence, p_fault)


def fit_two_thresholds(
    p_fault: np.ndarray,
    is_fault: np.ndarray,
    miss_cost: float,
    false_alarm_cost: float,
    offload_cost: float,
    max_offload: Optional[float] = None,
    grid: int = 101,
) -> TwoThresholdRule:
    """The (low, high) on a grid of p_fault quantiles with the least empirical cost per window
    (`max_offload`: only pairs offloading at most that fraction)."""
    p = np.asarray(p_fault, dtype=np.float64)
    fault = np.asarray(is_fault, dtype=bool)
    levels = np.unique(np.concatenate([[0.0, 1.0], np.quantile(p, np.linspace(0, 1, grid))]))
    best: Optional[Tuple[float, float, float]] = None
    for i, low in enumerate(levels):
        healthy_local = p <= low
        misses = float((healthy_local & fault).sum())
        for high in levels[i:]:
            fault_local = p >= high
            offloaded = ~(healthy_local | fault_local)
            if max_offload is not None and offloaded.mean() > max_offload + 1e-12:
                continue
            alarms = float((fault_local & ~fault & ~healthy_local).sum())
            cost = (miss_cost * misses + false_alarm_cost * alarms + offload_cost * offloaded.sum()) / p.size
            if best is None or cost < best[0] - 1e-12:
                best = (cost, float(low), float(high))
    if best is None:
        raise ValueError("no threshold pair meets max_offload")
    return TwoThresholdRule(best[1], best[2])


def theta_for_offload(confidence: np.ndarray, fraction: float) -> float:
    """The HI threshold that offloads `fraction` of windows with these max-softmax values."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    return float(np.quantile(np.asarray(confidence, dtype=np.float64), fraction)) if fraction > 0 else 0.0
