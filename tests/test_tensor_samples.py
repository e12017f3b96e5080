"""Raw samples as `.npy` payloads (`device_agent.sources.decode_tensor`): any card's input, e.g. a sensor's
int16 window, checked from its header before the body is read; images still decode as before."""

from __future__ import annotations

import io

import numpy as np
import pytest

from device_agent.sources import ImageError, ImageSizeError, decode_image, decode_tensor


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def test_a_window_decodes_as_the_cards_dtype_and_shape() -> None:
    window = np.arange(2 * 2048, dtype=np.int16).reshape(2, 2048)
    got = decode_tensor(_npy(window), (2, 2048), np.int16)
    assert got.dtype == np.int16 and np.array_equal(got, window)
    assert np.array_equal(decode_tensor(_npy(window[None]), (2, 2048), np.int16), window)  # a batch of one
    decoded = decode_image(_npy(window), (2, 2048), "message", dtype=np.int16)  # what the MQTT input calls
    assert np.array_equal(decoded.image, window) and decoded.label is None


def test_wrong_dtype_shape_or_body_is_refused_with_the_reason() -> None:
    window = np.zeros((2, 2048), dtype=np.int16)
    with pytest.raises(ImageError, match="float32 array, the model takes int16"):
        decode_tensor(_npy(window.astype(np.float32)), (2, 2048), np.int16)
    with pytest.raises(ImageSizeError, match=r"shape \[2, 1024\]"):
        decode_tensor(_npy(window[:, :1024]), (2, 2048), np.int16)
    with pytest.raises(ImageError, match="bytes of data"):
        decode_tensor(_npy(window)[:-10], (2, 2048), np.int16)
    with pytest.raises(ImageError, match="Fortran-order"):
        decode_tensor(_npy(np.asfortranarray(np.zeros((2, 2), dtype=np.int16))), (2, 2), np.int16)
    with pytest.raises(ImageError, match="not a readable .npy"):
        decode_tensor(b"\x93NUMPY\x09\x00junk", (2, 2048), np.int16)
    objects = io.BytesIO()
    np.save(objects, np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(ImageError):
        decode_tensor(objects.getvalue(), (2,), np.int16)  # a pickle is never loaded


def test_images_still_decode_as_images() -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), 7, dtype=np.uint8)).save(buf, format="PNG")
    decoded = decode_image(buf.getvalue(), (1, 28, 28))
    assert decoded.image.dtype == np.uint8 and decoded.image.shape == (1, 28, 28)
