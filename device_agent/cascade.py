"""Torch-free MEANet edge cascade on onnxruntime: the main and extension blocks (the cloud block is
`cloud_worker.model.CloudSession`).

The decision itself (softmax, entropy, the rule) is `device_agent.rule`; the card is `device_agent.card`.
Python 3.8 compatible and free of torch: this module runs on the device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from device_agent.card import NO_GATE, ModelCardError, load_card, sha256_file
from device_agent.rule import EdgeDecision, edge_decision, softmax, softmax_row
from video.providers import usable_providers

logger = logging.getLogger(__name__)


@dataclass
class MainOutput:
    """Main block outputs for a batch."""

    logits: np.ndarray  # float32 [N, num_classes]
    probs: np.ndarray  # float32 [N, num_classes]
    features: np.ndarray  # float32 [N, F, h, w], the input of the extension block


def _session_options(ort: Any, threads: Optional[int], cache_path: Optional[Path]) -> Any:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    # onnxruntime's pool busy-waits after each run by default: on a device paced by its camera that burns a
    # core between samples (measured: an agent at 100 samples/s took 110 % CPU instead of ~20 %) — power a
    # battery pays for and the energy meter rightly counts.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if cache_path is not None:
        # Saves the optimised graph once so later starts on a slow device skip the graph optimisation.
        opts.optimized_model_filepath = str(cache_path)
    return opts


def _open_session(
    path: Path, providers: Optional[Sequence[str]], threads: Optional[int], cache_dir: Optional[Path]
) -> Any:
    import onnxruntime as ort  # imported here so loading a card needs only numpy

    try:
        usable = usable_providers(providers, ort.get_available_providers())
    except ValueError as exc:
        raise ModelCardError(str(exc)) from None
    model_path = path
    cache_path = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        cached = cache_dir / (f"{path.stem}.{sha256_file(path)[:16]}.opt.onnx")
        if cached.exists():
            model_path = cached
        else:
            cache_path = cached
    opts = _session_options(ort, threads, cache_path)
    return ort.InferenceSession(str(model_path), sess_options=opts, providers=usable)


def _as_batch(images: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """Checks dtype/shape; a single CHW image becomes a batch of one."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 raw pixels, got {arr.dtype}")
    if arr.ndim == len(input_shape):
        arr = arr[None]
    if arr.ndim != len(input_shape) + 1 or list(arr.shape[1:]) != list(input_shape):
        raise ValueError(f"images must have shape [N, {', '.join(map(str, input_shape))}], got {arr.shape}")
    return np.ascontiguousarray(arr)


class EdgeCascade:
    """The device's part of MEANet (main + extension block) on onnxruntime."""

    def __init__(
        self,
        model_dir: Union[str, Path],
        providers: Optional[Sequence[str]] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        threads: Optional[int] = None,
        verify_sha256: bool = True,
    ) -> None:
        self.card = load_card(model_dir)
        cache = Path(cache_dir) if cache_dir is not None else None
        for name in ("main", "extension"):
            path = self.card.block_path(name)
            if not path.exists():
                raise ModelCardError(f"block file {path} listed in the card is missing")
            if verify_sha256 and sha256_file(path) != self.card.blocks[name].sha256:
                raise ModelCardError(f"block file {path} does not match the sha256 in the card")
        self._main = _open_session(self.card.block_path("main"), providers, threads, cache)
        self._ext = _open_session(self.card.block_path("extension"), providers, threads, cache)
        self.hard_classes = np.asarray(self.card.hard_classes, dtype=np.int64)
        self._is_hard = np.zeros(self.card.num_classes, dtype=bool)
        self._is_hard[self.hard_classes] = True
        self.entropy_tau = self.card.entropy_tau
        # The extension runs for a hard top-1 whose main max-softmax is in [low, high): above, the main block
        # is sure enough; below, the sample is headed for the cloud whatever the extension says.
        self.gate_low, self.gate_high = self.card.extension_gate
        # Per-call constants of the batch-1 path (`_decide_one`), computed once here.
        self._hard_set = frozenset(self.card.hard_classes)
        self._image_shape = tuple(self.card.input_shape)
        self._one_shape = (1,) + self._image_shape
        self._main_outputs = ["logits", "features"]
        self._ext_outputs = ["logits"]

    @property
    def input_shape(self) -> List[int]:
        return list(self.card.input_shape)

    def run_main(self, images: np.ndarray) -> MainOutput:
        """Main block on a uint8 batch: logits, softmax and the feature map for the extension."""
        batch = _as_batch(images, self.card.input_shape)
        logits, features = self._main.run(["logits", "features"], {"image": batch})
        return MainOutput(logits=logits, probs=softmax(logits), features=features)

    def run_extension(self, images: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Extension block: softmax over card.hard_classes (column j is class hard_classes[j])."""
        batch = _as_batch(images, self.card.input_shape)
        feats = np.ascontiguousarray(features, dtype=np.float32)
        if feats.shape[0] != batch.shape[0]:
            raise ValueError(f"features batch {feats.shape[0]} != images batch {batch.shape[0]}")
        (logits,) = self._ext.run(["logits"], {"image": batch, "features": feats})
        return softmax(logits)

    def decide(self, images: np.ndarray, gated: bool = True) -> List[EdgeDecision]:
        """The MEANet edge rule (`rule.edge_decision`) on a batch; the extension runs, batched, only on rows
        whose main top-1 is hard and, `gated`, whose confidence is in the card's gate (ungated: the edge's
        best answer, for a device that will not offload). A batch of one (the agent's case) takes
        `_decide_one`."""
        low, high = (self.gate_low, self.gate_high) if gated else (0.0, NO_GATE)
        if (
            type(images) is np.ndarray
            and images.dtype == np.uint8
            and images.shape in (self._one_shape, self._image_shape)
        ):
            return [self._decide_one(images.reshape(self._one_shape), low, high)]
        batch = _as_batch(images, self.card.input_shape)
        n = batch.shape[0]
        if n == 0:
            return []
        t0 = time.perf_counter()
        main = self.run_main(batch)
        main_ms = (time.perf_counter() - t0) * 1000.0 / n
        p_main = main.probs.max(axis=1)
        gated_rows = (p_main >= low) & (p_main < high)
        rows = np.flatnonzero(self._is_hard[main.probs.argmax(axis=1)] & gated_rows)
        ext: List[Optional[np.ndarray]] = [None] * n
        ext_ms = 0.0
        if rows.size:
            t1 = time.perf_counter()
            q = self.run_extension(batch[rows], main.features[rows])
            ext_ms = (time.perf_counter() - t1) * 1000.0 / rows.size
            for row, probs in zip(rows.tolist(), q):
                ext[row] = probs
        return [
            edge_decision(
                main.probs[i],
                ext[i],
                self.hard_classes,
                self.entropy_tau,
                main_ms + (ext_ms if ext[i] is not None else 0.0),
            )
            for i in range(n)
        ]

    def _decide_one(self, batch: np.ndarray, low: float, high: float) -> EdgeDecision:
        """`decide` on a checked uint8 batch of one: the same rule, with the batch-1 softmax (the agent runs
        batch 1, where numpy's per-call overhead on ~10 values is a sizeable share of a small model)."""
        if not batch.flags.c_contiguous:
            batch = np.ascontiguousarray(batch)
        t0 = time.perf_counter()
        logits, features = self._main.run(self._main_outputs, {"image": batch})
        probs = softmax_row(logits[0])
        q: Optional[np.ndarray] = None
        top1 = int(probs.argmax())
        if top1 in self._hard_set and low <= probs[top1] < high:
            (ext_logits,) = self._ext.run(self._ext_outputs, {"image": batch, "features": features})
            q = softmax_row(ext_logits[0])
        edge_ms = (time.perf_counter() - t0) * 1000.0
        return edge_decision(probs, q, self.hard_classes, self.entropy_tau, edge_ms)

    def main_only(self, image: np.ndarray) -> EdgeDecision:
        """The main block alone on one CHW image, as a decision (for policies that need no extension)."""
        batch = _as_batch(image, self.card.input_shape)
        t0 = time.perf_counter()
        (logits,) = self._main.run(["logits"], {"image": batch})
        probs = softmax_row(logits[0])
        return edge_decision(
            probs, None, self.hard_classes, self.entropy_tau, (time.perf_counter() - t0) * 1000.0
        )
