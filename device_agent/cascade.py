"""Torch-free MEANet edge cascade on onnxruntime: model card, main/extension blocks, edge rule, cloud model.

The rule (same as `training.reference`, which is its torch twin):
  1. main softmax over all classes; if its top-1 is not a hard class the sample exits at the main block;
  2. else the extension block runs (softmax over the hard classes) and its answer replaces the main one only
     where its max-probability is strictly higher;
  3. the edge answer (a full-class distribution) is *complex* when its normalised entropy exceeds
     `card.thresholds["entropy_tau"]`; a complex sample is the one a MEANet policy sends to the cloud.

Python 3.8 compatible and free of torch: this module runs on the device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

logger = logging.getLogger(__name__)

CARD_FILE = "card.json"
CARD_SCHEMA = 1
BLOCK_NAMES = ("main", "extension", "cloud")


class ModelCardError(ValueError):
    """The model directory or its card is missing, malformed or does not match its files."""


@dataclass(frozen=True)
class BlockInfo:
    """One exported block as the card describes it (costs are per single image)."""

    name: str
    file: str
    sha256: str
    macs: int
    params: int
    bytes_moved: int


@dataclass(frozen=True)
class ModelCard:
    """A typed view of card.json; `raw` keeps the whole document for fields this view does not name."""

    path: Path
    dataset: str
    backbone: str
    num_classes: int
    class_names: List[str]
    input_shape: List[int]
    input_dtype: str
    hard_classes: List[int]
    thresholds: Dict[str, Any]
    blocks: Dict[str, BlockInfo]
    accuracy: Dict[str, Any]
    training: Dict[str, Any]
    raw: Dict[str, Any] = field(repr=False)

    @property
    def entropy_tau(self) -> float:
        return float(self.thresholds["entropy_tau"])

    @property
    def hi_theta(self) -> float:
        return float(self.thresholds["hi_theta"])

    def block_path(self, name: str) -> Path:
        """Path of a block's ONNX file (`main`, `extension` or `cloud`)."""
        return self.path / self.blocks[name].file


def load_card(model_dir: Union[str, Path]) -> ModelCard:
    """Read and check `<model_dir>/card.json`; raises ModelCardError with the reason."""
    model_dir = Path(model_dir)
    card_path = model_dir / CARD_FILE
    try:
        raw = json.loads(card_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelCardError(f"no model card at {card_path} (run `edgecascade train`)") from None
    except ValueError as exc:
        raise ModelCardError(f"model card {card_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("schema") != CARD_SCHEMA:
        raise ModelCardError(f"model card {card_path}: unsupported schema {raw.get('schema')!r}")
    try:
        num_classes = int(raw["num_classes"])
        hard = sorted(int(c) for c in raw["hard_classes"])
        blocks = {
            name: BlockInfo(
                name=name,
                file=str(b["file"]),
                sha256=str(b["sha256"]),
                macs=int(b["macs"]),
                params=int(b["params"]),
                bytes_moved=int(b.get("bytes_moved", 0)),
            )
            for name, b in raw["blocks"].items()
        }
        card = ModelCard(
            path=model_dir,
            dataset=str(raw["dataset"]),
            backbone=str(raw["backbone"]),
            num_classes=num_classes,
            class_names=[str(n) for n in raw["class_names"]],
            input_shape=[int(d) for d in raw["input"]["shape"]],
            input_dtype=str(raw["input"].get("dtype", "uint8")),
            hard_classes=hard,
            thresholds=dict(raw["thresholds"]),
            blocks=blocks,
            accuracy=dict(raw.get("accuracy", {})),
            training=dict(raw.get("training", {})),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelCardError(f"model card {card_path} is incomplete: {exc!r}") from exc
    if not hard or any(c < 0 or c >= num_classes for c in hard) or len(set(hard)) != len(hard):
        raise ModelCardError(f"model card {card_path}: bad hard_classes {hard!r}")
    if len(card.class_names) != num_classes:
        raise ModelCardError(
            f"model card {card_path}: {len(card.class_names)} class names for {num_classes} classes"
        )
    for name in ("main", "extension"):
        if name not in blocks:
            raise ModelCardError(f"model card {card_path} lists no {name!r} block")
    for name in ("entropy_tau", "hi_theta"):
        if name not in card.thresholds:
            raise ModelCardError(f"model card {card_path} has no threshold {name!r}")
        value = card.thresholds[name]
        # `not 0 <= value <= 1` is also true for NaN, which would otherwise decide every sample one way
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ModelCardError(f"model card {card_path}: threshold {name} must be in [0, 1], got {value!r}")
    return card


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float32 like the graphs."""
    z = logits.astype(np.float32, copy=False)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_row(logits: np.ndarray) -> np.ndarray:
    """`softmax` of one 1-D float32 row: the same float32 operations in the same order (so the same bits),
    without the keepdims reductions and broadcasting that cost more than the arithmetic on ~10 values."""
    z = logits.astype(np.float32, copy=False)
    e = np.exp(z - z.max())
    e /= e.sum()
    return e


def _entropy_row(probs: np.ndarray, log_classes: float) -> float:
    """`normalised_entropy` of one 1-D distribution in plain float64 Python: on ~10 values a numpy ufunc call
    costs more than the whole sum. Equal to the numpy version up to float64 rounding (~1e-16)."""
    total = 0.0
    for p in probs.tolist():
        if p > 0.0:
            total -= p * math.log(p)
    eta = total / log_classes
    return 0.0 if eta < 0.0 else 1.0 if eta > 1.0 else eta


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """η = −Σ p log p / log C over the last axis (C = its length); 0 for one-hot, 1 for uniform."""
    p = np.asarray(probs, dtype=np.float64)
    num = p.shape[-1]
    if num < 2:
        return np.zeros(p.shape[:-1], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.clip(-terms.sum(axis=-1) / np.log(num), 0.0, 1.0)


@dataclass
class MainOutput:
    """Main block outputs for a batch."""

    logits: np.ndarray  # float32 [N, num_classes]
    probs: np.ndarray  # float32 [N, num_classes]
    features: np.ndarray  # float32 [N, F, h, w], the input of the extension block


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


def _session_options(ort: Any, threads: Optional[int], cache_path: Optional[Path]) -> Any:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if cache_path is not None:
        # Saves the optimised graph once so later starts on a slow device skip the graph optimisation.
        opts.optimized_model_filepath = str(cache_path)
    return opts


def _open_session(
    path: Path, providers: Optional[Sequence[str]], threads: Optional[int], cache_dir: Optional[Path]
) -> Any:
    import onnxruntime as ort  # imported here so loading a card needs only numpy

    providers = list(providers or ["CPUExecutionProvider"])
    available = set(ort.get_available_providers())
    usable = [p for p in providers if p in available]
    if not usable:
        raise ModelCardError(f"none of the providers {providers!r} is available (have {sorted(available)!r})")
    if len(usable) < len(providers):
        logger.warning("skipping unavailable providers %s", [p for p in providers if p not in available])
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
        # Per-call constants of the batch-1 path (`_decide_one`), computed once here.
        self._hard_set = frozenset(self.card.hard_classes)
        self._image_shape = tuple(self.card.input_shape)
        self._one_shape = (1,) + self._image_shape
        self._log_classes = math.log(self.card.num_classes) if self.card.num_classes > 1 else 0.0
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

    def decide(self, images: np.ndarray) -> List[EdgeDecision]:
        """The full MEANet edge rule on a batch; the extension runs only on rows whose main top-1 is hard.

        A batch of one (the agent's case) takes `_decide_one`, the same rule without the batch bookkeeping."""
        if (
            type(images) is np.ndarray
            and images.dtype == np.uint8
            and images.shape in (self._one_shape, self._image_shape)
            and self._log_classes > 0.0
        ):
            return [self._decide_one(images.reshape(self._one_shape))]
        batch = _as_batch(images, self.card.input_shape)
        n = batch.shape[0]
        if n == 0:
            return []
        t0 = time.perf_counter()
        main = self.run_main(batch)
        main_ms = (time.perf_counter() - t0) * 1000.0 / n
        top1 = main.probs.argmax(axis=1)
        p_main = main.probs.max(axis=1)
        edge_probs = main.probs.copy()
        answered_ext = np.zeros(n, dtype=bool)
        p_ext = np.full(n, np.nan, dtype=np.float32)
        ext_ms = np.zeros(n, dtype=np.float64)
        rows = np.flatnonzero(self._is_hard[top1])
        if rows.size:
            t1 = time.perf_counter()
            q = self.run_extension(batch[rows], main.features[rows])
            ext_ms[rows] = (time.perf_counter() - t1) * 1000.0 / rows.size
            p_ext[rows] = q.max(axis=1)
            better = p_ext[rows] > p_main[rows]  # ties keep the main answer
            take = rows[better]
            full = np.zeros((take.size, self.card.num_classes), dtype=np.float32)
            full[:, self.hard_classes] = q[better]
            edge_probs[take] = full
            answered_ext[take] = True
        entropy = normalised_entropy(edge_probs)
        prediction = edge_probs.argmax(axis=1)
        decisions = []
        for i in range(n):
            ran_ext = bool(self._is_hard[top1[i]])
            decisions.append(
                EdgeDecision(
                    prediction=int(prediction[i]),
                    exit_stage="extension" if ran_ext else "main",
                    probs=edge_probs[i],
                    p_main=float(p_main[i]),
                    p_ext=float(p_ext[i]) if ran_ext else None,
                    entropy=float(entropy[i]),
                    complex=bool(entropy[i] > self.entropy_tau),
                    edge_ms=float(main_ms + ext_ms[i]),
                    answered_by="extension" if answered_ext[i] else "main",
                )
            )
        return decisions

    def _decide_one(self, batch: np.ndarray) -> EdgeDecision:
        """`decide` on a checked uint8 batch of one: the same rule and the same float32 arithmetic, in plain
        Python where numpy's per-call overhead on ~10 values would cost more than the work (the agent runs
        batch 1, and at batch 1 that overhead is a sizeable share of a small model's inference)."""
        if not batch.flags.c_contiguous:
            batch = np.ascontiguousarray(batch)
        t0 = time.perf_counter()
        logits, features = self._main.run(self._main_outputs, {"image": batch})
        probs = _softmax_row(logits[0])
        edge_ms = (time.perf_counter() - t0) * 1000.0
        top1 = int(probs.argmax())
        p_main = probs[top1]  # float32, compared in float32 as the batch path does
        p_ext: Optional[float] = None
        answered_by = "main"
        exit_stage = "main"
        prediction = top1
        if top1 in self._hard_set:
            exit_stage = "extension"
            t1 = time.perf_counter()
            (ext_logits,) = self._ext.run(self._ext_outputs, {"image": batch, "features": features})
            q = _softmax_row(ext_logits[0])
            edge_ms += (time.perf_counter() - t1) * 1000.0
            best = int(q.argmax())
            q_max = q[best]
            p_ext = float(q_max)
            if q_max > p_main:  # ties keep the main answer
                full = np.zeros(self.card.num_classes, dtype=np.float32)
                full[self.hard_classes] = q
                probs = full
                prediction = int(full.argmax())
                answered_by = "extension"
        entropy = _entropy_row(probs, self._log_classes)
        return EdgeDecision(
            prediction=prediction,
            exit_stage=exit_stage,
            probs=probs,
            p_main=float(p_main),
            p_ext=p_ext,
            entropy=entropy,
            complex=entropy > self.entropy_tau,
            edge_ms=edge_ms,
            answered_by=answered_by,
        )


class CloudModel:
    """The cloud block on onnxruntime: uint8 batch in, softmax over all classes out."""

    def __init__(
        self,
        model_path: Union[str, Path],
        providers: Optional[Sequence[str]] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        threads: Optional[int] = None,
    ) -> None:
        self.path = Path(model_path)
        if not self.path.exists():
            raise ModelCardError(f"cloud model {self.path} does not exist")
        self._session = _open_session(self.path, providers, threads, Path(cache_dir) if cache_dir else None)
        shape = self._session.get_inputs()[0].shape
        # Batch axis is symbolic; the others are fixed by the export.
        self.input_shape = [int(d) for d in shape[1:]]

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Raw logits [N, num_classes]."""
        batch = _as_batch(images, self.input_shape)
        (out,) = self._session.run(["logits"], {"image": batch})
        return out

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Softmax [N, num_classes]."""
        return softmax(self.logits(images))
