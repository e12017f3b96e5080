"""Drift detection on the device: the main block's outputs over a sliding window against the model card's
calibration profile, by two-sample Kolmogorov-Smirnov tests with the false-alarm rate bounded.

What is tested (Rabanser, Günnemann & Lipton, "Failing Loudly", NeurIPS 2019: black-box shift detection, one
univariate KS test per softmax output, Bonferroni over them): the main block's confidence (max softmax) and
each class's softmax output. The confidence alone misses shifts the model is confidently wrong about (a
lowered contrast turns the black background grey: Fashion-MNIST accuracy falls to 12 % at an unchanged
confidence), which move the class outputs instead. Every policy that runs the edge runs the main block, so
the profile is the same whatever the policy; `cloud-only` computes nothing on the device and is not watched.

The outputs alone miss what the model is robust to: a model fine-tuned on noise, blur and shifts keeps
its confidence under mild ones (18 of the 24 corruptions of the suite caught within 500 samples, measured
on the first robust models), though the inputs have changed and the cloud's answers may not have. So the
profile may also hold six statistics of the input image (`INPUT_FEATURES`, model-free, numpy): brightness,
contrast, edge density (noise raises it, blur and JPEG lower it), the share of dark background (a grey
background, a lifted black level), how far the intensity centroid is off centre (shifts) and the tilt of
its second moments (rotation). They are computed a window at a time when a test is due, from a bounded ring
of the window's images (300 x 784 bytes for Fashion-MNIST), not per sample.

Repeated testing: a window of `window` samples is tested every `stride` samples, each of F features. The
per-test level is alpha * stride / (horizon * F) (Bonferroni over the F features and the horizon / stride
tests of `horizon` clean samples), so the chance of any false alarm in `horizon` in-distribution samples is
at most `alpha` (overlapping windows are positively correlated, which only makes the bound looser), as far
as the asymptotic p-value is right: measured, clean windows reject within Monte Carlo error of the nominal
level at 1-20 % (tests/test_drift.py); the far tail where the per-test level lies is not measurable.

The reference is stored as quantiles (`DriftReference`); its two-sample statistic uses the calibration
sample's size m, so the test is the two-sample one, not a one-sample test against a known distribution.
Python >= 3.8, numpy only (this runs on the device).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

REFERENCE_KEY = "drift_reference"  # where the card keeps the profile (training/drift_profile.py writes it)
CONFIDENCE = "confidence"


class DriftProfileError(ValueError):
    """A card's drift reference that cannot be used."""


INPUT_FEATURES = [
    "input_mean",
    "input_contrast",
    "input_edges",
    "input_dark",
    "input_offcentre",
    "input_tilt",
]
DARK = 8  # of 255: a pixel below it is background


def feature_names(num_classes: int, inputs: bool = False) -> List[str]:
    """The monitored features, in the order `features` computes them."""
    return [CONFIDENCE] + [f"p{c}" for c in range(num_classes)] + (INPUT_FEATURES if inputs else [])


def features(main_probs: np.ndarray, images: Optional[np.ndarray] = None) -> np.ndarray:
    """The features of main-block softmax rows [N, C] (or one row [C]): [N, 1 + C], confidence first; with
    the images the rows came from, their `input_features` after them: [N, 1 + C + 6]."""
    p = np.asarray(main_probs, dtype=np.float64)
    p = p.reshape(1, -1) if p.ndim == 1 else p
    out = np.concatenate([p.max(axis=1, keepdims=True), p], axis=1)
    return out if images is None else np.concatenate([out, input_features(images)], axis=1)


def input_features(images: np.ndarray) -> np.ndarray:
    """`INPUT_FEATURES` of uint8 images [N, C, H, W] (channels averaged): [N, 6] float64."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4:
        raise DriftProfileError(f"input features need images [N, C, H, W], got shape {x.shape}")
    x = x.mean(axis=1) / 255.0  # [N, H, W]
    n, h, w = x.shape
    mean = x.mean(axis=(1, 2))
    contrast = x.std(axis=(1, 2))
    # Total variation per pixel over the contrast: texture, not how strong the image is.
    variation = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(x, axis=2)).mean(axis=(1, 2))
    edges = variation / (contrast + 1e-3)
    dark = (x < DARK / 255.0).mean(axis=(1, 2))
    mass = x / np.maximum(x.sum(axis=(1, 2), keepdims=True), 1e-9)
    ys = np.arange(h) - (h - 1) / 2.0
    xs = np.arange(w) - (w - 1) / 2.0
    cy = (mass.sum(axis=2) * ys).sum(axis=1)
    cx = (mass.sum(axis=1) * xs).sum(axis=1)
    offcentre = np.hypot(cy / h, cx / w)  # as a fraction of the side
    dy = ys[None, :, None] - cy[:, None, None]
    dx = xs[None, None, :] - cx[:, None, None]
    spread = (mass * (dx * dx + dy * dy)).sum(axis=(1, 2))
    tilt = (mass * dx * dy).sum(axis=(1, 2)) / np.maximum(spread, 1e-9)
    return np.stack([mean, contrast, edges, dark, offcentre, tilt], axis=1)


@dataclass(frozen=True)
class DriftReference:
    """The calibration profile: each feature's quantiles at evenly spaced levels over its `samples` values."""

    features: List[str]
    quantiles: np.ndarray  # float64 [F, Q], row f non-decreasing, levels 0, 1/(Q-1), ..., 1
    samples: int  # m: the size of the calibration sample
    source: str = ""  # what it was computed on (split, seed, models)

    def __post_init__(self) -> None:
        q = self.quantiles
        if q.ndim != 2 or q.shape[0] != len(self.features) or q.shape[1] < 2:
            raise DriftProfileError(f"quantiles of shape {q.shape} for {len(self.features)} features")
        if not np.all(np.isfinite(q)) or np.any(np.diff(q, axis=1) < 0):
            raise DriftProfileError("quantiles must be finite and non-decreasing")
        if self.samples < 2:
            raise DriftProfileError(f"a reference of {self.samples} samples")

    @classmethod
    def of(
        cls, values: np.ndarray, names: Sequence[str], levels: int = 201, source: str = ""
    ) -> DriftReference:
        """The profile of feature values [m, F] (`features` of the calibration sample)."""
        v = np.asarray(values, dtype=np.float64)
        # Quantiles that are sample values (inverted CDF): ties and point masses stay where they are.
        q = np.quantile(v, np.linspace(0.0, 1.0, levels), axis=0, method="inverted_cdf").T
        return cls(list(names), np.ascontiguousarray(q), int(v.shape[0]), source)

    @classmethod
    def from_card(cls, raw: Dict[str, Any]) -> Optional[DriftReference]:
        """The profile in card.json (`raw`), or None when the card has none."""
        ref = raw.get(REFERENCE_KEY)
        if ref is None:
            return None
        try:
            return cls(
                [str(f) for f in ref["features"]],
                np.asarray(ref["quantiles"], dtype=np.float64),
                int(ref["samples"]),
                str(ref.get("source", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DriftProfileError(f"card's {REFERENCE_KEY} is unusable: {exc}") from exc

    def to_json(self) -> Dict[str, Any]:
        # 6 significant digits: the quantiles of the small class outputs span many decades.
        rows = [[float(f"{x:.6g}") for x in row] for row in self.quantiles]
        return {
            "features": self.features,
            "samples": self.samples,
            "levels": self.quantiles.shape[1],
            "quantiles": rows,
            "source": self.source,
        }

    def cdf(self, feature: int, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The reference CDF of one feature at `x`: its right and left limits (F(x), F(x-)). Linear between
        quantiles; a run of equal quantiles is a point mass, where the CDF jumps across the run's levels."""
        q = self.quantiles[feature]
        levels = np.linspace(0.0, 1.0, q.size)
        lo = np.searchsorted(q, x, side="left")
        hi = np.searchsorted(q, x, side="right")
        exact = hi > lo  # x is one of the quantiles
        inner = np.interp(x, q, levels)  # 0 below the first quantile, 1 above the last
        right = np.where(exact, levels[np.maximum(hi - 1, 0)], inner)
        left = np.where(exact, levels[np.minimum(lo, q.size - 1)], inner)
        return right, left


def ks_statistic(window_sorted: np.ndarray, reference: DriftReference, feature: int) -> float:
    """sup |F_window - F_reference| of one feature, exactly: between two of the window's points F_window is
    flat and F_reference monotone, so the sup is reached at the points, from the right or from the left."""
    x = window_sorted
    n = x.size
    right, left = reference.cdf(feature, x)
    above = np.searchsorted(x, x, side="right") / n  # F_window(x), ties included
    below = np.searchsorted(x, x, side="left") / n  # F_window(x-)
    return float(max(np.max(np.abs(above - right)), np.max(np.abs(below - left))))


def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution: 2 sum_k (-1)^(k-1) exp(-2 k^2 lam^2)."""
    if lam < 0.2:
        return 1.0  # the series converges slowly there, and the answer is 1 to 10 digits anyway
    total = 0.0
    for k in range(1, 101):
        term = math.exp(-2.0 * k * k * lam * lam)
        total += term if k % 2 else -term
        if term < 1e-16:
            break
    return min(1.0, max(0.0, 2.0 * total))


def ks_pvalue(d: float, n: int, m: int) -> float:
    """Two-sample KS p-value of statistic `d` for sizes n and m: the asymptotic Kolmogorov distribution at
    sqrt(ne) d with Stephens' small-sample correction (Numerical Recipes' `kstwo`), ne = n m / (n + m)."""
    ne = n * m / (n + m)
    root = math.sqrt(ne)
    return kolmogorov_sf((root + 0.12 + 0.11 / root) * d)


@dataclass(frozen=True)
class DriftSettings:
    """How the monitor tests (validated when built)."""

    window: int = 300  # samples per tested window
    stride: int = 50  # a test every this many samples
    alpha: float = 0.01  # at most this chance of any false alarm ...
    horizon: int = 100_000  # ... in this many in-distribution samples

    def __post_init__(self) -> None:
        if self.window < 10 or not 1 <= self.stride <= self.window:
            raise ValueError(
                f"drift window {self.window}, stride {self.stride}: need 10 <= window, stride in 1..window"
            )
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"drift alpha must be in (0, 1), got {self.alpha!r}")
        if self.horizon < self.stride:
            raise ValueError(f"drift horizon {self.horizon} shorter than one stride {self.stride}")

    def level(self, features: int) -> float:
        """The per-test level: Bonferroni over the features and the horizon's tests."""
        return self.alpha * self.stride / (self.horizon * features)


@dataclass
class DriftCheck:
    """One test of the window ending at sample `seq`."""

    seq: int  # the last sample of the window
    samples: int  # samples watched so far in this process
    window: int
    statistic: float  # the KS statistic of the most significant feature
    feature: str  # ... which it is
    p_value: float  # ... its p-value (the smallest)
    level: float  # the per-test level it was compared with
    drift: bool  # p_value < level
    checked_unix: float


class DriftMonitor:
    """Feed it each sample's main-block softmax, and its image where the profile watches the inputs
    (`observe`); every `stride` samples, once the window is full, it tests and returns a `DriftCheck`.
    Not thread-safe: the inference thread owns it."""

    def __init__(self, reference: DriftReference, settings: DriftSettings = DriftSettings()) -> None:
        self.reference = reference
        self.settings = settings
        self.level = settings.level(len(reference.features))
        inputs = len(INPUT_FEATURES)
        self.watches_inputs = reference.features[-inputs:] == INPUT_FEATURES
        outputs = len(reference.features) - (inputs if self.watches_inputs else 0)
        self._buffer = np.zeros((settings.window, outputs), dtype=np.float64)
        self._images: Optional[np.ndarray] = None  # the window's images, allocated at the first one
        self.samples = 0
        self.checks = 0
        self.alarms = 0  # checks that found drift
        self.last: Optional[DriftCheck] = None
        self.first_alarm_seq: Optional[int] = None

    def observe(
        self, main_probs: np.ndarray, seq: int, image: Optional[np.ndarray] = None
    ) -> Optional[DriftCheck]:
        """One sample's main-block softmax [C] (and its image [C, H, W], uint8, where the profile watches the
        inputs); the test's result when this sample completes a stride."""
        s = self.settings
        slot = self.samples % s.window
        row = self._buffer[slot]
        if main_probs.size != row.size - 1:
            raise DriftProfileError(f"{main_probs.size} class outputs for a profile of {row.size - 1}")
        if self.watches_inputs:
            if image is None:
                raise DriftProfileError("this drift profile watches the inputs: observe needs each image")
            image = np.asarray(image)
            image = image.reshape(image.shape[-3:]) if image.ndim >= 3 else image.reshape(1, *image.shape)
            if self._images is None or self._images.shape[1:] != image.shape:
                self._images = np.zeros((s.window, *image.shape), dtype=np.uint8)
            self._images[slot] = image
        row[0] = main_probs.max()  # `features`, one row at a time: no per-sample arrays
        row[1:] = main_probs
        self.samples += 1
        if self.samples < s.window or (self.samples - s.window) % s.stride:
            return None
        return self._check(seq)

    def _check(self, seq: int) -> DriftCheck:
        values = self._buffer
        if self.watches_inputs and self._images is not None:
            values = np.concatenate([values, input_features(self._images)], axis=1)
        window = np.sort(values, axis=0)  # ring order does not matter to an empirical CDF
        n, m = window.shape[0], self.reference.samples
        best_p, best_d, best_f = 2.0, 0.0, 0
        for f in range(window.shape[1]):
            d = ks_statistic(window[:, f], self.reference, f)
            p = ks_pvalue(d, n, m)
            if p < best_p:
                best_p, best_d, best_f = p, d, f
        check = DriftCheck(
            seq=seq,
            samples=self.samples,
            window=n,
            statistic=best_d,
            feature=self.reference.features[best_f],
            p_value=best_p,
            level=self.level,
            drift=best_p < self.level,
            checked_unix=time.time(),
        )
        self.checks += 1
        if check.drift:
            self.alarms += 1
            if self.first_alarm_seq is None:
                self.first_alarm_seq = seq
        self.last = check
        return check

    def report(self) -> Dict[str, Any]:
        """What the run's end says about drift."""
        last = self.last
        return {
            "samples": self.samples,
            "checks": self.checks,
            "alarms": self.alarms,
            "first_alarm_seq": self.first_alarm_seq,
            "drifting": bool(last.drift) if last is not None else False,
            "level": self.level,
            **{k: getattr(self.settings, k) for k in ("window", "stride", "alpha", "horizon")},
        }
