"""The fault-detection model card (`models/vibration/card.json`): a typed, checked view (numpy-free).

Three tiers, each an ONNX classifier of one window: `sensor` (on the accelerometer's microcontroller),
`gateway` (on the site's gateway), `cloud`. The card names their files, sha256, MACs, parameters and bytes
moved (for `metering.analytic`), the input (shape, dtype, sample rate), the classes and the thresholds of
HI's rule and the two-threshold rule per tier, calibrated on the validation recordings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

from device_agent.card import CARD_FILE, ModelCardError, sha256_file
from device_agent.card import (
    BlockInfo as Tier,
)  # a tier's file and costs, as the classification card's blocks

TIERS = ("sensor", "gateway", "cloud")


class FaultCardError(ModelCardError):
    """The model directory or its card is missing, malformed or does not match its files."""


@dataclass(frozen=True)
class FaultCard:
    path: Path
    classes: List[str]
    fault_free_class: int
    input_shape: Tuple[int, ...]
    input_dtype: str
    sample_rate_hz: float
    tiers: Dict[str, Tier]
    thresholds: Dict[str, Any]
    raw: Dict[str, Any] = field(repr=False)

    def tier_path(self, name: str) -> Path:
        return self.path / self.tiers[name].file

    @property
    def window_s(self) -> float:
        """Seconds of signal in one window: the sensor's period between two windows (no overlap)."""
        return self.input_shape[-1] / self.sample_rate_hz

    def hi_theta(self, tier: str) -> float:
        return float(self.thresholds["hi_theta"][tier])

    def two_thresholds(self, tier: str) -> Tuple[float, float]:
        low, high = self.thresholds["two_threshold"][tier]
        return float(low), float(high)

    def verify(self, name: str) -> Path:
        """The tier's file, checked against its sha256 (FaultCardError if missing or different)."""
        path = self.tier_path(name)
        try:
            digest = sha256_file(path)
        except FileNotFoundError:
            raise FaultCardError(f"{path} listed in {self.path / CARD_FILE} is missing") from None
        if digest != self.tiers[name].sha256:
            raise FaultCardError(f"{path} does not match the sha256 in its card: retrain or re-publish")
        return path


def load_fault_card(model_dir: Union[str, Path]) -> FaultCard:
    model_dir = Path(model_dir)
    card_path = model_dir / CARD_FILE
    try:
        raw = json.loads(card_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FaultCardError(f"no model card at {card_path} (run `make train-fault`)") from None
    except ValueError as exc:
        raise FaultCardError(f"model card {card_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("task") != "fault-detection":
        raise FaultCardError(f"{card_path} is not a fault-detection card (task {raw.get('task')!r})")
    try:
        blocks = raw["blocks"]
        card = FaultCard(
            path=model_dir,
            classes=[str(c) for c in raw["classes"]],
            fault_free_class=int(raw["fault_free_class"]),
            input_shape=tuple(int(d) for d in raw["input"]["shape"]),
            input_dtype=str(raw["input"]["dtype"]),
            sample_rate_hz=float(raw["input"]["sample_rate_hz"]),
            tiers={name: Tier.from_card(name, blocks[name]) for name in TIERS},
            thresholds=dict(raw["thresholds"]),
            raw=raw,
        )
        for tier in ("sensor", "gateway"):
            theta = card.hi_theta(tier)
            low, high = card.two_thresholds(tier)
            if not (0.0 <= theta <= 1.0 and 0.0 <= low <= high <= 1.0):
                raise FaultCardError(
                    f"{card_path}: thresholds of {tier} out of [0, 1]: {theta}, {low}, {high}"
                )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, FaultCardError):
            raise
        raise FaultCardError(f"model card {card_path} is incomplete: {exc!r}") from exc
    if not 0 <= card.fault_free_class < len(card.classes) or card.sample_rate_hz <= 0:
        raise FaultCardError(f"{card_path}: bad fault_free_class or sample_rate_hz")
    return card
