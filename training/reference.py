"""MEANet inference rule in torch (reference for device_agent.cascade), hard classes, calibration, metrics."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from device_agent.card import NO_GATE

HARD_MODES = ("lowest-accuracy", "confusion-pairs")


@dataclass
class EdgeResult:
    """The edge rule applied to a batch (tensors on CPU, one row per sample)."""

    prediction: torch.Tensor  # int64 [N]
    ran_extension: torch.Tensor  # bool [N]: main top-1 was a hard class, its confidence in the gate
    answered_by_extension: torch.Tensor  # bool [N]: the extension's answer was kept
    probs: torch.Tensor  # float32 [N, C]: the edge answer as a full-class distribution
    p_main: torch.Tensor  # float32 [N]
    p_ext: torch.Tensor  # float32 [N], NaN where the extension did not run
    entropy: torch.Tensor  # float64 [N], normalised


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """η = −Σ p log p / log C, in float64 like the numpy twin."""
    p = probs.double()
    terms = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return (-terms.sum(-1) / math.log(p.shape[-1])).clamp(0.0, 1.0)


def edge_rule(
    main_logits: torch.Tensor,
    ext_logits: torch.Tensor,
    hard_classes: List[int],
    gate: Tuple[float, float] = (0.0, NO_GATE),
) -> EdgeResult:
    """Main top-1 not hard, or its max-softmax outside the gate [low, high) -> main answer; else the more
    confident of main and extension (ties: main).

    `ext_logits` holds the extension's logits for every row; rows where it did not run ignore them.
    """
    main_probs = torch.softmax(main_logits.float(), dim=1)
    num_classes = main_probs.shape[1]
    hard = torch.as_tensor(hard_classes, dtype=torch.long)
    is_hard = torch.zeros(num_classes, dtype=torch.bool)
    is_hard[hard] = True
    p_main, top1 = main_probs.max(dim=1)
    ran = is_hard[top1] & (p_main >= gate[0]) & (p_main < gate[1])
    q = torch.softmax(ext_logits.float(), dim=1)
    p_ext_all = q.max(dim=1).values
    take = ran & (p_ext_all > p_main)
    ext_full = torch.zeros_like(main_probs)
    ext_full[:, hard] = q
    probs = torch.where(take[:, None], ext_full, main_probs)
    p_ext = torch.where(ran, p_ext_all, torch.full_like(p_ext_all, float("nan")))
    return EdgeResult(
        prediction=probs.argmax(dim=1),
        ran_extension=ran,
        answered_by_extension=take,
        probs=probs,
        p_main=p_main,
        p_ext=p_ext,
        entropy=normalised_entropy(probs),
    )


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    pred = logits.argmax(1)
    acc = torch.zeros(num_classes, dtype=torch.float64)
    for c in range(num_classes):
        mask = labels == c
        acc[c] = (pred[mask] == c).double().mean() if mask.any() else 1.0
    return acc


def select_hard_classes(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int, count: int, mode: str = "lowest-accuracy"
) -> List[int]:
    """Hard classes from validation outputs of the trained main block.

    lowest-accuracy: the `count` classes with the lowest per-class accuracy (ties: lower class id).
    confusion-pairs: classes of the most confused pairs (C[i,j] + C[j,i]) taken greedily until `count`.
    """
    if not 1 <= count < num_classes:
        raise ValueError(f"hard class count must be in 1..{num_classes - 1}, got {count}")
    if mode == "lowest-accuracy":
        acc = per_class_accuracy(logits, labels, num_classes)
        order = sorted(range(num_classes), key=lambda c: (float(acc[c]), c))
        return sorted(order[:count])
    if mode == "confusion-pairs":
        conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
        conf.index_put_((labels, logits.argmax(1)), torch.ones_like(labels), accumulate=True)
        sym = conf + conf.T
        pairs = sorted(
            ((int(sym[i, j]), i, j) for i in range(num_classes) for j in range(i + 1, num_classes)),
            key=lambda t: (-t[0], t[1], t[2]),
        )
        chosen: List[int] = []
        for _, i, j in pairs:
            for c in (i, j):
                if c not in chosen and len(chosen) < count:
                    chosen.append(c)
            if len(chosen) >= count:
                break
        return sorted(chosen)
    raise ValueError(f"unknown hard-class mode {mode!r}; choose from {', '.join(HARD_MODES)}")


@dataclass
class OffloadCalibration:
    threshold: float  # offload where score > threshold
    fraction: float
    accuracy: float
    target_accuracy: float
    met_target: bool


def calibrate_offload(
    score: torch.Tensor,
    edge_correct: torch.Tensor,
    cloud_correct: torch.Tensor,
    max_fraction: float = 0.25,
    tolerance: float = 0.003,
    confidence: float = 0.95,
) -> OffloadCalibration:
    """Smallest offload fraction (≤ max_fraction) whose cascade stays within `tolerance` of the cloud's
    accuracy on a fresh sample of this size, with probability `confidence`.

    Samples are offloaded in decreasing `score`. The cascade-minus-cloud difference is a mean of paired
    per-sample terms (edge − cloud correctness on the samples kept), so its standard error follows from the
    discordant pairs; the rule asks that difference − z·√2·SE ≥ −tolerance, √2 because the test split
    is a second sample as noisy as this one. (Without the margin, the first fraction to cross the target on
    5,000 validation images trailed the cloud by 0.45 pp on test in one run of `make train`.) Confidence 0.5
    gives the plain rule. Where no fraction within the (equally shrunk) cap qualifies, the most accurate one
    within it is taken. The threshold is the midpoint between the last offloaded and the first kept score, so
    rounding differences between torch and onnxruntime do not move it onto a sample.
    """
    n = int(score.shape[0])
    order = torch.argsort(score.double(), descending=True, stable=True)
    s = score.double()[order]
    edge_c = edge_correct[order].double()
    cloud_c = cloud_correct[order].double()
    zero = torch.zeros(1, dtype=torch.float64)
    # accuracy when the first k (k = 0..n) in this order go to the cloud
    acc = (edge_c.sum() - torch.cat([zero, edge_c.cumsum(0)]) + torch.cat([zero, cloud_c.cumsum(0)])) / n
    cloud_acc = float(cloud_c.mean())
    diff = acc - cloud_acc
    discordant = (edge_c != cloud_c).double()
    kept_discordant = (discordant.sum() - torch.cat([zero, discordant.cumsum(0)])) / n  # mean of d_i^2
    se = torch.sqrt(torch.clamp(kept_discordant - diff**2, min=0.0) / n)
    z = statistics.NormalDist().inv_cdf(confidence)
    bound = diff - z * math.sqrt(2.0) * se
    # the cap gets the same margin: a fraction at the cap on validation exceeds it on test half the time
    cap = max_fraction - z * math.sqrt(2.0 * max_fraction * (1.0 - max_fraction) / n)
    k_max = max(0, int(math.floor(cap * n + 1e-9)))
    reached = torch.nonzero(bound[: k_max + 1] >= -tolerance - 1e-12).flatten()
    if reached.numel():
        k, met = int(reached[0]), True
    else:
        k, met = int(torch.argmax(acc[: k_max + 1])), False  # argmax returns the first (smallest k) maximum
    if k == 0:
        threshold = float(s[0]) + 1e-6
    elif k == n:
        threshold = float(s[-1]) - 1e-6
    else:
        threshold = float((s[k - 1] + s[k]) / 2)
    fraction = float((score.double() > threshold).double().mean())
    return OffloadCalibration(threshold, fraction, float(acc[k]), cloud_acc - tolerance, met)


def cascade_metrics(
    labels: torch.Tensor,
    main_logits: torch.Tensor,
    ext_logits: torch.Tensor,
    cloud_logits: Optional[torch.Tensor],
    hard_classes: List[int],
    entropy_tau: Optional[float] = None,
    hi_theta: Optional[float] = None,
    gate: Tuple[float, float] = (0.0, NO_GATE),
) -> Dict[str, float]:
    """Accuracies per stage and for the cascades on one split (the keys of card.accuracy.<split>).

    The edge's own figures (`edge_on_hard`, `edge_cascade`) are the extension ungated: what a device that
    offloads nothing answers (edge-only). The cascade and `extension_rate` are the gated rule's (meanet)."""
    edge = edge_rule(main_logits, ext_logits, hard_classes, gate)
    full = edge_rule(main_logits, ext_logits, hard_classes)
    main_pred = main_logits.argmax(1)
    hard = torch.as_tensor(hard_classes, dtype=torch.long)
    on_hard = torch.isin(labels, hard)
    ext_pred = hard[ext_logits.argmax(1)]
    out = {
        "samples": float(labels.shape[0]),
        "main": _mean(main_pred == labels),
        "main_on_hard": _mean((main_pred == labels)[on_hard]),
        "extension_on_hard": _mean((ext_pred == labels)[on_hard]),  # the extension alone, hard-class samples
        "edge_on_hard": _mean((full.prediction == labels)[on_hard]),  # main + extension, hard-class samples
        "edge_cascade": _mean(full.prediction == labels),
        "extension_rate": _mean(edge.ran_extension),
        "extension_rate_ungated": _mean(full.ran_extension),
    }
    if cloud_logits is not None:
        cloud_pred = cloud_logits.argmax(1)
        out["cloud"] = _mean(cloud_pred == labels)
        if entropy_tau is not None:
            off = edge.entropy > entropy_tau
            final = torch.where(off, cloud_pred, edge.prediction)
            out["cascade"] = _mean(final == labels)
            out["offload_fraction"] = _mean(off)
        if hi_theta is not None:
            p_main = torch.softmax(main_logits.float(), 1).max(1).values
            off_hi = p_main < hi_theta
            out["hi_cascade"] = _mean(torch.where(off_hi, cloud_pred, main_pred) == labels)
            out["hi_offload_fraction"] = _mean(off_hi)
    return out


def _mean(mask: torch.Tensor) -> float:
    return float(mask.double().mean()) if mask.numel() else float("nan")


def calibrate_thresholds(
    labels: torch.Tensor,
    main_logits: torch.Tensor,
    ext_logits: torch.Tensor,
    cloud_logits: torch.Tensor,
    hard_classes: List[int],
    max_fraction: float = 0.25,
    tolerance: float = 0.003,
    confidence: float = 0.95,
    gate: Tuple[float, float] = (0.0, NO_GATE),
) -> Tuple[OffloadCalibration, OffloadCalibration]:
    """τ for the MEANet rule (edge answer's entropy) and θ for hi-threshold (main max-softmax), on val."""
    edge = edge_rule(main_logits, ext_logits, hard_classes, gate)
    cloud_correct = cloud_logits.argmax(1) == labels
    tau = calibrate_offload(
        edge.entropy, edge.prediction == labels, cloud_correct, max_fraction, tolerance, confidence
    )
    p_main, main_pred = torch.softmax(main_logits.float(), 1).max(1)
    hi = calibrate_offload(
        -p_main.double(), main_pred == labels, cloud_correct, max_fraction, tolerance, confidence
    )
    # the hi rule accepts where p >= theta, i.e. offloads where -p > -theta
    hi.threshold = -hi.threshold
    return tau, hi


# The gates `calibrate_gate` tries: bounds on the main block's max-softmax (NO_GATE: no upper bound).
GATE_LOWS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)
GATE_HIGHS = (0.7, 0.8, 0.9, 0.95, 0.99, NO_GATE)


@dataclass
class GateCalibration:
    gate: Tuple[float, float]
    extension_rate: float  # on the calibration split, with the gate
    accuracy: float  # the cascade's, offloading `fraction` by entropy, with the gate
    ungated_extension_rate: float
    ungated_accuracy: float
    fraction: float


def calibrate_gate(
    labels: torch.Tensor,
    main_logits: torch.Tensor,
    ext_logits: torch.Tensor,
    cloud_logits: torch.Tensor,
    hard_classes: List[int],
    fraction: float,
    tolerance: float = 0.001,
) -> GateCalibration:
    """The extension gate with the lowest extension rate whose cascade (offloading the `fraction` of highest
    edge entropy) stays within `tolerance` of the ungated cascade's accuracy on this split (validation).

    The extension's cost is paid on every sample it runs for, but it changes the outcome only where it
    overrides the main answer and that answer is not offloaded anyway: a confident main block or one headed
    for the cloud gains nothing from it.
    """
    cloud_correct = cloud_logits.argmax(1) == labels

    def evaluate(gate: Tuple[float, float]) -> Tuple[float, float]:
        edge = edge_rule(main_logits, ext_logits, hard_classes, gate)
        off = edge.entropy >= torch.quantile(edge.entropy, 1.0 - fraction)
        correct = torch.where(off, cloud_correct, edge.prediction == labels)
        return float(edge.ran_extension.double().mean()), float(correct.double().mean())

    ungated_rate, ungated_acc = evaluate((0.0, NO_GATE))
    best = GateCalibration((0.0, NO_GATE), ungated_rate, ungated_acc, ungated_rate, ungated_acc, fraction)
    for low in GATE_LOWS:
        for high in GATE_HIGHS:
            if low >= high:
                continue
            rate, acc = evaluate((low, high))
            if acc >= ungated_acc - tolerance and rate < best.extension_rate:
                best = GateCalibration((low, high), rate, acc, ungated_rate, ungated_acc, fraction)
    return best
