"""The fault hierarchy offline: every tier's model on every window, and the answers its rules give from those
outputs. The reference the live benchmark checks its rows against (`bench.fault_bench`) and what the
published card's figures are computed with (`training.fault_publish`): one replay, as the tiers decide live
(`vibration.sensor`, `cloud_worker.gateway`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from vibration.card import FaultCard

TIER_NAMES = ("sensor", "gateway", "cloud")


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def tier_probs(card: FaultCard, x: np.ndarray, batch: int = 128) -> Dict[str, np.ndarray]:
    """Softmax of every tier's model on every window (onnxruntime, one thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    out = {}
    for tier in TIER_NAMES:
        session = ort.InferenceSession(str(card.verify(tier)), opts, providers=["CPUExecutionProvider"])
        logits = np.concatenate(
            [session.run(["logits"], {"window": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
        )
        out[tier] = softmax_rows(logits)
    return out


def hierarchy(
    probs: Dict[str, np.ndarray], sensor_rule: Any, gateway_rule: Optional[Any]
) -> Tuple[np.ndarray, np.ndarray]:
    """(final prediction, exit stage) of every window: the sensor's rule answers or passes the window up; the
    gateway's rule (None: no gateway, straight to the cloud) answers or forwards it; the cloud answers with
    its likeliest class. A tier that answers gives its rule's answer (the two-threshold rule's "fault" is the
    likeliest fault class even where "healthy" is likelier)."""
    n = len(probs["sensor"])
    pred, stage = np.empty(n, dtype=np.int64), np.empty(n, dtype=object)
    for i in range(n):
        local = sensor_rule.decide(probs["sensor"][i])
        if not local.offload:
            pred[i], stage[i] = local.prediction, "main"
            continue
        at_gateway = None if gateway_rule is None else gateway_rule.decide(probs["gateway"][i])
        if at_gateway is None or at_gateway.offload:
            pred[i], stage[i] = int(probs["cloud"][i].argmax()), "cloud"
        else:
            pred[i], stage[i] = at_gateway.prediction, "gateway"
    return pred, stage
