"""The corruption suite: deterministic per image, shape and dtype kept, each kind hand-checked where it can
be, severities ordered. Synthetic images (no dataset needed)."""

from __future__ import annotations

import numpy as np
import pytest

from training.corruptions import KINDS, SEVERITIES, Corruption, corrupt, suite


def images(n: int = 16) -> np.ndarray:
    """Grey squares on black, like a centred Fashion-MNIST item: [n, 1, 28, 28] uint8."""
    rng = np.random.default_rng(0)
    out = np.zeros((n, 1, 28, 28), dtype=np.uint8)
    for i in range(n):
        out[i, 0, 8:20, 8:20] = rng.integers(120, 255, size=(12, 12))
    return out


def test_the_suite_is_every_kind_at_every_severity_in_a_fixed_order() -> None:
    names = [c.name for c in suite()]
    assert len(names) == len(KINDS) * len(SEVERITIES) == len(set(names))
    assert names[:3] == ["gaussian-noise-1", "gaussian-noise-2", "gaussian-noise-3"]
    assert Corruption.parse("salt-pepper-2") == Corruption("salt-pepper", 2)
    assert Corruption("gaussian-noise", 2).parameter == 0.15  # issue #16's sigma
    for bad in ("blur", "blur-4", "fog-1"):
        with pytest.raises(ValueError):
            Corruption.parse(bad)


@pytest.mark.parametrize("corruption", suite(), ids=lambda c: c.name)
def test_each_corruption_is_deterministic_per_image_and_keeps_shape_and_dtype(corruption: Corruption) -> None:
    x = images()
    once = corrupt(x, corruption)
    assert once.shape == x.shape and once.dtype == np.uint8
    assert np.array_equal(once, corrupt(x, corruption))  # same seed, same bytes
    # An image's corruption depends on its index, not on the batch it came in.
    assert np.array_equal(corrupt(x[5:9], corruption, indices=range(5, 9)), once[5:9])
    assert np.array_equal(corrupt(x[:, 0], corruption), once[:, 0])  # [N, H, W] works too
    assert not np.array_equal(once, x)
    if corruption.kind in ("gaussian-noise", "salt-pepper", "shift", "rotate"):  # random per image
        assert not np.array_equal(corrupt(x, corruption, seed=1), once)


def test_kinds_by_hand() -> None:
    x = np.zeros((1, 28, 28), dtype=np.uint8)
    x[0, 10:18, 10:18] = 200
    mean = x.mean() / 255
    contrast = corrupt(x, Corruption("contrast", 1))  # (x - mean) * 0.5 + mean
    assert contrast[0, 0, 0] == round(255 * mean * 0.5) and contrast[0, 12, 12] == round(
        255 * ((200 / 255 - mean) * 0.5 + mean)
    )
    assert corrupt(x, Corruption("brightness", 1))[0, 0, 0] == round(0.2 * 255)  # the background lifted
    noise = corrupt(np.full((200, 28, 28), 128, np.uint8), Corruption("gaussian-noise", 2)).astype(float)
    assert abs(noise.std() / 255 - 0.15) < 0.005 and abs(noise.mean() - 128) < 0.5
    sp = corrupt(np.full((200, 28, 28), 128, np.uint8), Corruption("salt-pepper", 2))
    assert abs(np.mean(sp == 0) - 0.04) < 0.005 and abs(np.mean(sp == 255) - 0.04) < 0.005
    shifted = corrupt(x, Corruption("shift", 3)).astype(float)
    rows, cols = np.nonzero(shifted[0])
    centre = np.average(np.stack([rows, cols], 1), axis=0, weights=shifted[0][rows, cols])
    assert np.hypot(*(centre - 13.5)) == pytest.approx(4.0, abs=0.3)  # 4 px from the centre
    assert corrupt(x, Corruption("blur", 2))[0, 13, 13] == 200  # the inside of a flat square stays
    with pytest.raises(ValueError):
        corrupt(x.astype(np.float32), Corruption("blur", 1))


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_higher_severity_moves_the_pixels_further(kind: str) -> None:
    x = images()
    moved = [np.abs(corrupt(x, Corruption(kind, s)).astype(float) - x).mean() for s in SEVERITIES]
    assert moved[0] < moved[1] < moved[2]
