"""The MEANet edge rule, softmax and normalised entropy: defined once, here, for every part that decides.

The rule (`training.reference` is its torch twin, tested to decide alike on the 10,000 test images):
  1. main softmax over all classes; if its top-1 is not a hard class, or its max-softmax is outside the
     card's extension gate [low, high) (`card.extension_gate`; no gate: always inside), the sample exits at
     the main block;
  2. else the extension block runs (softmax over the hard classes) and its answer replaces the main one only
     where its max-probability is strictly higher (ties keep the main answer);
  3. the edge answer (a full-class distribution) is *complex* when its normalised entropy exceeds
     `card.thresholds["entropy_tau"]`; a complex sample is the one a MEANet policy sends to the cloud.

`softmax` and `normalised_entropy` are the array definitions; `softmax_row` and `entropy_row` are their
batch-1 forms (the agent's case), the same arithmetic without numpy's per-call overhead on ~10 values,
tested equal to the array forms (bit for bit for softmax, to float64 rounding for entropy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float32 like the graphs."""
    z = logits.astype(np.float32, copy=False)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def softmax_row(logits: np.ndarray) -> np.ndarray:
    """`softmax` of one 1-D float32 row: the same float32 operations in the same order (so the same bits),
    without the keepdims reductions and broadcasting that cost more than the arithmetic on ~10 values."""
    z = logits.astype(np.float32, copy=False)
    e = np.exp(z - z.max())
    e /= e.sum()
    return e


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """η = −Σ p log p / log C over the last axis (C = its length); 0 for one-hot, 1 for uniform."""
    p = np.asarray(probs, dtype=np.float64)
    num = p.shape[-1]
    if num < 2:
        return np.zeros(p.shape[:-1], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.clip(-terms.sum(axis=-1) / np.log(num), 0.0, 1.0)


def entropy_row(probs: np.ndarray) -> float:
    """`normalised_entropy` of one 1-D distribution in plain float64 Python: on ~10 values a numpy ufunc call
    costs more than the whole sum. Equal to the numpy version up to float64 rounding (~1e-16)."""
    values = probs.tolist()
    if len(values) < 2:
        return 0.0
    total = 0.0
    for p in values:
        if p > 0.0:
            total -= p * math.log(p)
    eta = total / math.log(len(values))
    return 0.0 if eta < 0.0 else 1.0 if eta > 1.0 else eta


@dataclass
class EdgeDecision:
    """The edge's answer for one sample.

    exit_stage is "extension" whenever the extension block ran (so its cost counts), even where the main
    answer was kept because it was the more confident one; `answered_by` says whose answer `prediction` is.
    """

    prediction: int
    exit_stage: str  # "main" | "extension"
    probs: np.ndarray  # float32 [num_classes], the edge answer as a full-class distribution
    p_main: float  # max softmax of the main block
    p_ext: Optional[float]  # max softmax of the extension block, None where it did not run
    entropy: float  # normalised entropy of `probs`
    complex: bool  # entropy > card.thresholds["entropy_tau"]
    edge_ms: float  # compute time of this sample (batch time shared equally over the batch's samples)
    answered_by: str = "main"  # "main" | "extension"
    main_probs: Optional[np.ndarray] = None  # the main block's softmax, whatever answered (drift watches it)


def edge_decision(
    main_probs: np.ndarray,
    ext_probs: Optional[np.ndarray],
    hard_classes: np.ndarray,
    tau: float,
    edge_ms: float,
) -> EdgeDecision:
    """Steps 2 and 3 of the rule for one sample: `main_probs` over all classes, `ext_probs` over the hard
    classes (None when the main top-1 was not hard, so the extension did not run)."""
    top1 = int(main_probs.argmax())
    p_main = main_probs[top1]  # float32, compared in float32
    probs, prediction, answered_by, p_ext = main_probs, top1, "main", None
    if ext_probs is not None:
        q_max = ext_probs.max()
        p_ext = float(q_max)
        if q_max > p_main:
            probs = np.zeros(main_probs.shape[-1], dtype=np.float32)
            probs[hard_classes] = ext_probs
            prediction, answered_by = int(probs.argmax()), "extension"
    entropy = entropy_row(probs)
    return EdgeDecision(
        prediction=prediction,
        exit_stage="main" if ext_probs is None else "extension",
        probs=probs,
        p_main=float(p_main),
        p_ext=p_ext,
        entropy=entropy,
        complex=entropy > tau,
        edge_ms=edge_ms,
        answered_by=answered_by,
        main_probs=main_probs,
    )
