"""A deterministic corruption suite for grey images: kinds x severities, seeded per image.

Shared by the benchmark (`edgecascade bench --corruptions`, `bench/drift_bench.py`) and, later, training
augmentation: numpy, Pillow and scipy only, no torch, so importing it costs neither side a framework.
The kinds follow Hendrycks & Dietterich's ImageNet-C (noise, blur, digital, geometric), sized for 28x28
Fashion-MNIST: severity 1 is a visible nuisance, 3 is what a dirty lens, a dark room or a bad codec does.

Determinism: image `i` of a corruption depends only on (seed, kind, severity, i) and its pixels, never on
which other images are corrupted with it (a per-image generator), so a prefix, a subset or a shuffled
training batch sees the same corrupted pixels as the whole test split.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage

SEVERITIES = (1, 2, 3)
DEFAULT_SEED = 0

Transform = Callable[[np.ndarray, np.random.Generator, float], np.ndarray]  # float [0,1] HxW -> same


def _gaussian_noise(x: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return x + rng.normal(0.0, sigma, x.shape)


def _salt_pepper(x: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    u = rng.random(x.shape)
    out = x.copy()
    out[u < fraction / 2] = 0.0
    out[u > 1.0 - fraction / 2] = 1.0
    return out


def _blur(x: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma, mode="constant")


def _contrast(x: np.ndarray, rng: np.random.Generator, factor: float) -> np.ndarray:
    mean = x.mean()
    return (x - mean) * factor + mean


def _brightness(x: np.ndarray, rng: np.random.Generator, offset: float) -> np.ndarray:
    return x + offset  # the black background turns grey: what the models never saw


def _shift(x: np.ndarray, rng: np.random.Generator, pixels: float) -> np.ndarray:
    # A random direction at a fixed distance; the vacated border is background (0).
    angle = rng.uniform(0.0, 2.0 * np.pi)
    return ndimage.shift(x, (pixels * np.sin(angle), pixels * np.cos(angle)), order=1, mode="constant")


def _rotate(x: np.ndarray, rng: np.random.Generator, degrees: float) -> np.ndarray:
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return ndimage.rotate(x, sign * degrees, reshape=False, order=1, mode="constant")


def _jpeg(x: np.ndarray, rng: np.random.Generator, quality: float) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(x), mode="L").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded, dtype=np.float64) / 255.0


# kind -> (transform, its parameter at severities 1, 2, 3, unit of the parameter). Noise σ is a fraction of
# full scale: 0.15 is the σ of issue #16's first measurement.
KINDS: Dict[str, Tuple[Transform, Tuple[float, float, float], str]] = {
    "gaussian-noise": (_gaussian_noise, (0.08, 0.15, 0.25), "sigma, fraction of full scale"),
    "salt-pepper": (_salt_pepper, (0.03, 0.08, 0.15), "fraction of pixels"),
    "blur": (_blur, (0.75, 1.0, 1.5), "gaussian sigma, px"),
    "contrast": (_contrast, (0.5, 0.3, 0.15), "factor around the image mean"),
    "brightness": (_brightness, (0.2, 0.35, 0.5), "offset, fraction of full scale"),
    "shift": (_shift, (2.0, 3.0, 4.0), "px, random direction"),
    "rotate": (_rotate, (10.0, 20.0, 30.0), "degrees, random sign"),
    "jpeg": (_jpeg, (20.0, 10.0, 5.0), "JPEG quality"),
}


@dataclass(frozen=True)
class Corruption:
    """One kind at one severity (1-3), e.g. `Corruption("gaussian-noise", 2)`, named `gaussian-noise-2`."""

    kind: str
    severity: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown corruption {self.kind!r} (known: {', '.join(KINDS)})")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.severity}"

    @property
    def parameter(self) -> float:
        return KINDS[self.kind][1][self.severity - 1]

    @property
    def describe(self) -> str:
        return f"{self.name} ({KINDS[self.kind][2]} {self.parameter:g})"

    @classmethod
    def parse(cls, name: str) -> Corruption:
        """`gaussian-noise-2` -> Corruption("gaussian-noise", 2)."""
        kind, sep, severity = name.rpartition("-")
        if not sep or not severity.isdigit():
            raise ValueError(f"a corruption is <kind>-<severity>, e.g. blur-2; got {name!r}")
        return cls(kind, int(severity))


def suite(kinds: Optional[Sequence[str]] = None, severities: Sequence[int] = SEVERITIES) -> List[Corruption]:
    """Every kind (or those named) at every severity (or those given), in a fixed order."""
    return [Corruption(kind, s) for kind in (kinds or list(KINDS)) for s in severities]


def corrupt(
    images: np.ndarray,
    corruption: Corruption,
    seed: int = DEFAULT_SEED,
    indices: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """uint8 images ([N,H,W] or [N,1,H,W]) corrupted, same shape and dtype. `indices` names each image's
    place in its dataset (default 0..N-1): it, not the position in this batch, seeds the image's noise."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[1] != 1):
        raise ValueError(f"images must be uint8 [N,H,W] or [N,1,H,W], got {arr.dtype} {arr.shape}")
    flat = arr.reshape(arr.shape[0], arr.shape[-2], arr.shape[-1])
    where = range(len(flat)) if indices is None else indices
    if len(where) != len(flat):
        raise ValueError(f"{len(where)} indices for {len(flat)} images")
    transform, params, _ = KINDS[corruption.kind]
    param = params[corruption.severity - 1]
    # crc32, not hash(): the same key in every process (str hashes are salted per interpreter).
    kind_key = zlib.crc32(corruption.kind.encode())
    out = np.empty_like(flat)
    for row, (image, index) in enumerate(zip(flat, where)):
        rng = np.random.default_rng([seed, kind_key, corruption.severity, int(index)])
        out[row] = _to_uint8(transform(image.astype(np.float64) / 255.0, rng, param))
    return out.reshape(arr.shape)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
