"""The model card: a typed, checked view of `card.json` beside the exported blocks (numpy-free, torch-free).

`edgecascade train` writes it (training/publish.py); the device, the cloud worker and the benchmark read it
here: block files and their sha256, MACs, input shape, hard classes, the calibrated thresholds.

The input is whatever the card says (`input.shape`, `input.dtype`, optionally `input.sample_rate_hz`): a
uint8 image [1, 28, 28] for Fashion-MNIST, int16 accelerometer counts [2, 2048] at 12 kHz for fault detection.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from protocol.codec import TENSOR_DTYPES

CARD_FILE = "card.json"
NO_GATE = 2.0  # above any softmax: the extension gate's upper bound when the card sets none
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

    @classmethod
    def from_card(cls, name: str, block: Dict[str, Any]) -> BlockInfo:
        """A card's `blocks.<name>` entry (KeyError, TypeError or ValueError where it is incomplete)."""
        return cls(
            name=name,
            file=str(block["file"]),
            sha256=str(block["sha256"]),
            macs=int(block["macs"]),
            params=int(block["params"]),
            bytes_moved=int(block.get("bytes_moved", 0)),
        )


@dataclass(frozen=True)
class ModelCard:
    """A typed view of card.json; `raw` keeps the whole document for fields this view does not name."""

    path: Path
    dataset: str
    backbone: str
    num_classes: int
    class_names: List[str]
    input_shape: List[int]
    input_dtype: str  # one of protocol.codec.TENSOR_DTYPES: what the device reads, checks and sends
    hard_classes: List[int]
    thresholds: Dict[str, Any]
    blocks: Dict[str, BlockInfo]
    accuracy: Dict[str, Any]
    training: Dict[str, Any]
    raw: Dict[str, Any] = field(repr=False)
    input_sample_rate_hz: Optional[float] = None  # a time series' rate (a window of samples), else None

    @property
    def entropy_tau(self) -> float:
        return float(self.thresholds["entropy_tau"])

    @property
    def hi_theta(self) -> float:
        return float(self.thresholds["hi_theta"])

    @property
    def extension_gate(self) -> Tuple[float, float]:
        """The band [low, high) of the main block's max-softmax where the extension runs (for a hard
        top-1); a card without one runs it for every hard top-1 (the MEANet rule as published)."""
        low, high = self.thresholds.get("extension_gate", (0.0, NO_GATE))
        return float(low), float(high)

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
        blocks = {name: BlockInfo.from_card(name, b) for name, b in raw["blocks"].items()}
        card = ModelCard(
            path=model_dir,
            dataset=str(raw["dataset"]),
            backbone=str(raw["backbone"]),
            num_classes=num_classes,
            class_names=[str(n) for n in raw["class_names"]],
            input_shape=[int(d) for d in raw["input"]["shape"]],
            input_dtype=str(raw["input"].get("dtype", "uint8")),
            input_sample_rate_hz=(
                None if raw["input"].get("sample_rate_hz") is None else float(raw["input"]["sample_rate_hz"])
            ),
            hard_classes=hard,
            thresholds=dict(raw["thresholds"]),
            blocks=blocks,
            accuracy=dict(raw.get("accuracy", {})),
            training=dict(raw.get("training", {})),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelCardError(f"model card {card_path} is incomplete: {exc!r}") from exc
    if card.input_dtype not in TENSOR_DTYPES:
        raise ModelCardError(
            f"model card {card_path}: input dtype {card.input_dtype!r} is not one of {sorted(TENSOR_DTYPES)}"
        )
    if not card.input_shape or any(d < 1 for d in card.input_shape):
        raise ModelCardError(f"model card {card_path}: bad input shape {card.input_shape!r}")
    rate = card.input_sample_rate_hz
    if rate is not None and not (rate > 0 and rate < float("inf")):
        raise ModelCardError(f"model card {card_path}: input sample_rate_hz must be > 0, got {rate!r}")
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
    gate = card.thresholds.get("extension_gate", [0.0, NO_GATE])
    if (
        not isinstance(gate, list)
        or len(gate) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in gate)
        or not 0.0 <= gate[0] < gate[1] <= NO_GATE
    ):
        raise ModelCardError(
            f"model card {card_path}: extension_gate must be [low, high) with 0 <= low < high <= {NO_GATE}, "
            f"got {gate!r}"
        )
    return card


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
