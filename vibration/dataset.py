"""Splits of simulated recordings cut into windows: separate recordings (other seeds) per split.

A window is what the sensor classifies: int16 [channels, WINDOW] counts at SAMPLE_RATE_HZ. Windows of one
recording never appear in two splits: a split's recordings are seeded with the split's own code, so train,
validation and test share no recording (and no speed, load, resonance or noise draw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from vibration.simulate import CONDITIONS, SAMPLE_RATE_HZ, SEVERITIES, Recording, simulate

WINDOW = 2048  # samples per window: 170.7 ms at 12 kHz, a dozen or more impacts of any fault here
CHANNELS = 2
SPLIT_CODES = {"train": 1, "validation": 2, "test": 3}
FAULT_FREE = 0  # class index of "healthy": every other class is a fault


@dataclass(frozen=True)
class SplitSpec:
    """`recordings` per (fault, severity); healthy gets as many as each fault has, so classes balance."""

    split: str
    recordings: int
    duration_s: float = 2.0
    hop: int = WINDOW  # samples between window starts (train may overlap: hop < WINDOW)
    seed: int = 0


@dataclass
class Windows:
    """Windows of a split and, per window, what it came from."""

    x: np.ndarray  # int16 [N, CHANNELS, WINDOW]
    y: np.ndarray  # int64 [N] class index (CONDITIONS)
    severity: np.ndarray  # int64 [N] (0: healthy)
    recording: np.ndarray  # int64 [N] the recording's index in the split

    def __len__(self) -> int:
        return int(self.y.size)


def recordings(spec: SplitSpec) -> Iterator[Tuple[int, Recording]]:
    """(index, recording) of a split, in a fixed order."""
    if spec.split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_CODES)}, got {spec.split!r}")
    index = 0
    for label, condition in enumerate(CONDITIONS):
        severities = [0] if condition == "healthy" else list(SEVERITIES)
        per = spec.recordings * (len(SEVERITIES) if condition == "healthy" else 1)
        for severity in severities:
            for k in range(per):
                seed = (spec.seed, SPLIT_CODES[spec.split], label, severity, k)
                yield (
                    index,
                    simulate(
                        condition, max(severity, 1), seed, duration_s=spec.duration_s, channels=CHANNELS
                    ),
                )
                index += 1


def cut(signal: np.ndarray, hop: int = WINDOW, window: int = WINDOW) -> np.ndarray:
    """Windows [K, channels, window] of one recording [channels, samples]."""
    if hop < 1:
        raise ValueError("hop must be at least 1")
    starts = range(0, signal.shape[1] - window + 1, hop)
    if not len(starts):
        return np.zeros((0, signal.shape[0], window), dtype=signal.dtype)
    return np.stack([signal[:, s : s + window] for s in starts])


def make_windows(spec: SplitSpec, limit: Optional[int] = None) -> Windows:
    """All windows of a split (`limit`: at most that many, spread evenly over the split)."""
    xs: List[np.ndarray] = []
    meta: List[Tuple[int, int, int]] = []
    for index, rec in recordings(spec):
        w = cut(rec.signal, spec.hop)
        xs.append(w)
        label = CONDITIONS.index(rec.spec.condition)
        meta.extend([(label, rec.spec.severity, index)] * len(w))
    x = np.concatenate(xs).astype(np.int16)
    m = np.asarray(meta, dtype=np.int64)
    if limit is not None and limit < len(x):
        keep = np.linspace(0, len(x) - 1, limit).round().astype(np.int64)
        x, m = x[keep], m[keep]
    return Windows(x=x, y=m[:, 0], severity=m[:, 1], recording=m[:, 2])


def describe(windows: Windows) -> Dict[str, int]:
    """Windows per class name."""
    return {name: int((windows.y == i).sum()) for i, name in enumerate(CONDITIONS)}


__all__ = ["CHANNELS", "SAMPLE_RATE_HZ", "WINDOW", "SplitSpec", "Windows", "cut", "make_windows"]
