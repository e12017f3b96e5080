"""One sample on its way through the agent, the edge views policies see, and the record it ends as."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from device_agent.cascade import EdgeCascade
from device_agent.durable import Origin
from device_agent.policies import Decision, EdgeView, PolicyError
from device_agent.rule import softmax_row
from protocol import InferenceRecord, OffloadReply


class Sample:
    """Mutable state of one sample; fields are filled as it goes (slots: there are many of these)."""

    __slots__ = (
        "seq", "image", "label", "future", "ts_unix", "view", "decision", "blocks", "edge_ms",
        "compute_s", "bytes_up", "bytes_down", "network_ms", "reply", "offload_outbox_id",
        "device_j_gross", "device_j_net", "energy_done", "exit_stage", "finished", "sink", "origin",
        "model_version",
    )  # fmt: skip

    def __init__(
        self, seq: int, image: Any, label: Optional[int], future: Optional[Future], ts_unix: float
    ) -> None:
        self.seq = seq
        self.image = image
        self.label = label
        self.future = future
        self.ts_unix = ts_unix
        self.view = EdgeView(stage="none", seq=seq)
        self.decision: Optional[Decision] = None
        self.blocks: List[str] = []
        self.edge_ms = 0.0
        self.compute_s = 0.0
        self.bytes_up = 0
        self.bytes_down = 0
        self.network_ms: Optional[float] = None
        self.reply: Optional[OffloadReply] = None
        self.offload_outbox_id: Optional[int] = None
        self.device_j_gross: Optional[float] = None
        self.device_j_net: Optional[float] = None
        self.energy_done = False
        self.exit_stage: Optional[str] = None
        self.finished = False
        self.sink: Optional[Callable[[Optional[InferenceRecord]], None]] = None  # run_dataset's tally
        self.origin: Optional[Origin] = None  # the source item it came from, marked done with its record
        self.model_version: Optional[str] = None  # the model version that answered it at the edge


def edge_view(cascade: EdgeCascade, edge: str, image: np.ndarray, seq: int) -> Tuple[EdgeView, List[str]]:
    """Run what a policy needing `edge` must see: (view, blocks run)."""
    if edge == "none":
        return EdgeView(stage="none", seq=seq), []
    if edge == "main":
        d = cascade.main_only(image)
        blocks = ["main"]
    elif edge in ("cascade", "full"):  # full: the extension ungated, for a device that will not offload
        d = cascade.decide(image, gated=edge == "cascade")[0]
        blocks = ["main", "extension"] if d.exit_stage == "extension" else ["main"]
    else:
        raise PolicyError(f"unknown edge need {edge!r}")
    view = EdgeView(
        stage=edge,
        probs=d.probs,
        prediction=d.prediction,
        exit_stage=d.exit_stage,
        p_main=d.p_main,
        p_ext=d.p_ext,
        entropy=d.entropy,
        complex=d.complex if edge in ("cascade", "full") else None,
        seq=seq,
        main_probs=d.main_probs,
    )
    return view, blocks


def record_of(
    sample: Sample,
    exit_stage: str,
    *,
    run_id: str,
    device_id: str,
    energy_source: str,
    analytic_j: Optional[float],
) -> InferenceRecord:
    """The sample's result record as things stand (`exit_stage`: main, extension, cloud, fallback or shed)."""
    view, reply = sample.view, sample.reply
    p_cloud = cloud_ms = cloud_j = None
    if exit_stage == "cloud" and reply is not None:
        prediction = int(reply.prediction)
        probs = softmax_row(np.asarray(reply.logits, dtype=np.float32).reshape(-1))
        p_cloud = float(probs[prediction]) if 0 <= prediction < probs.size else None
        cloud_ms, cloud_j = float(reply.cloud_ms), reply.cloud_j
    else:
        # No edge answer at all (cloud-only with nothing run on the device): -1, never a made-up class.
        prediction = view.prediction if view.prediction is not None else -1
    return InferenceRecord(
        run_id=run_id,
        device_id=device_id,
        seq=sample.seq,
        prediction=prediction,
        exit_stage=exit_stage,
        edge_ms=sample.edge_ms,
        label=sample.label,
        p_main=view.p_main,
        p_ext=view.p_ext,
        p_cloud=p_cloud,
        network_ms=sample.network_ms if exit_stage == "cloud" else None,
        cloud_ms=cloud_ms,
        bytes_up=sample.bytes_up,
        bytes_down=sample.bytes_down,
        device_j_gross=sample.device_j_gross,
        device_j_net=sample.device_j_net,
        device_j_analytic=analytic_j,
        cloud_j=cloud_j,
        energy_source=energy_source,
        ts_unix=sample.ts_unix,
        model_version=sample.model_version,
    )
