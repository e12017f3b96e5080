"""Sample sources of the agent: IDX datasets, PNG (stdlib zlib) and PGM decoding, the watched directory."""

from __future__ import annotations

import gzip
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from device_agent.cli import parse_source
from device_agent.sources import (
    ImageError,
    decode_pgm,
    decode_png,
    label_from_name,
    load_idx_dataset,
    read_image,
    watch_directory,
)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _filter_row(kind: int, row: np.ndarray, prev: np.ndarray, bpp: int) -> bytes:
    """PNG's forward filters (spec section 9), written independently of the decoder under test."""
    r, p = row.astype(np.int64).tolist(), prev.astype(np.int64).tolist()
    out = []
    for x, value in enumerate(r):
        a = r[x - bpp] if x >= bpp else 0
        b = p[x]
        c = p[x - bpp] if x >= bpp else 0
        if kind == 0:
            pred = 0
        elif kind == 1:
            pred = a
        elif kind == 2:
            pred = b
        elif kind == 3:
            pred = (a + b) // 2
        else:
            pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        out.append((value - pred) % 256)
    return bytes([kind]) + bytes(out)


def make_png(pixels: np.ndarray, color: int, filters: list, palette: np.ndarray = None) -> bytes:
    h, w = pixels.shape[:2]
    flat = pixels.reshape(h, -1)
    bpp = flat.shape[1] // w
    prev = np.zeros(flat.shape[1], dtype=np.uint8)
    raw = b""
    for y in range(h):
        raw += _filter_row(filters[y % len(filters)], flat[y], prev, bpp)
        prev = flat[y]
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
    if palette is not None:
        png += _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    # split the data over two IDAT chunks, as encoders may
    data = zlib.compress(raw)
    return png + _chunk(b"IDAT", data[:10]) + _chunk(b"IDAT", data[10:]) + _chunk(b"IEND", b"")


@pytest.mark.parametrize("color, channels", [(0, 1), (2, 3), (4, 2), (6, 4)])
def test_png_decodes_every_filter_type(color: int, channels: int) -> None:
    rng = np.random.default_rng(color)
    pixels = rng.integers(0, 256, size=(7, 9, channels), dtype=np.uint8)
    png = make_png(pixels, color, filters=[0, 1, 2, 3, 4])
    assert np.array_equal(decode_png(png), pixels)


def test_png_palette_and_what_pillow_writes(tmp_path: Path) -> None:
    palette = np.array([[0, 0, 0], [255, 0, 0], [10, 20, 30]])
    index = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    assert np.array_equal(decode_png(make_png(index[:, :, None], 3, [4], palette)), palette[index])
    Image = pytest.importorskip("PIL.Image")  # a real encoder's choice of filters, where Pillow is at hand
    gradient = (np.add.outer(np.arange(28), np.arange(28)) * 4 % 256).astype(np.uint8)
    Image.fromarray(gradient, "L").save(tmp_path / "g.png", optimize=True)
    assert np.array_equal(read_image(tmp_path / "g.png", (1, 28, 28))[0], gradient)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"GIF89a", "not a PNG"),
        (b"\x89PNG\r\n\x1a\n" + _chunk(b"IEND", b""), "lacks IHDR"),
        (
            b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 16, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(bytes(10))),
            "bit depth 16",
        ),
        (
            b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", b"not zlib"),
            "corrupt PNG",
        ),
    ],
)
def test_bad_png_raises_image_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_png(data)


def test_pgm_binary_ascii_and_maxval() -> None:
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    assert np.array_equal(decode_pgm(b"P5\n# a comment\n4 3\n255\n" + pixels.tobytes())[:, :, 0], pixels)
    ascii_pgm = b"P2 4 3 15\n" + b" ".join(str(v).encode() for v in range(12))
    assert decode_pgm(ascii_pgm)[2, 3, 0] == 11 * 255 // 15
    with pytest.raises(ImageError, match="PGM body has"):
        decode_pgm(b"P5 4 3 255\n" + b"\x00" * 5)
    with pytest.raises(ImageError, match="unsupported PGM"):
        decode_pgm(b"P6 4 3 255\n" + b"\x00" * 36)


def test_read_image_converts_colour_and_checks_the_shape(tmp_path: Path) -> None:
    rgb = np.zeros((28, 28, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    (tmp_path / "c.png").write_bytes(make_png(rgb, 2, [0]))
    grey = read_image(tmp_path / "c.png", (1, 28, 28))
    assert grey.shape == (1, 28, 28) and grey.dtype == np.uint8 and grey[0, 0, 0] == round(200 * 0.299)
    (tmp_path / "small.pgm").write_bytes(b"P5 8 8 255\n" + bytes(64))
    with pytest.raises(ImageError, match="image is 8x8x1, the model takes 28x28x1"):
        read_image(tmp_path / "small.pgm", (1, 28, 28))


def test_label_from_name() -> None:
    assert label_from_name(Path("img_0001_label7.png")) == 7
    assert label_from_name(Path("label-3.pgm")) == 3
    assert label_from_name(Path("cam-2024-01-01.png")) is None


def test_watch_yields_each_settled_file_once_and_flags_bad_ones(tmp_path: Path) -> None:
    pixels = np.full((28, 28), 9, dtype=np.uint8)
    for i in range(3):
        (tmp_path / f"s{i}_label{i}.pgm").write_bytes(b"P5 28 28 255\n" + pixels.tobytes())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG nonsense")
    (tmp_path / "notes.txt").write_text("ignored")
    stop = threading.Event()
    seen = []

    def consume() -> None:
        for path, image, label in watch_directory(tmp_path, (1, 28, 28), stop, poll_s=0.02, settle_s=0.0):
            seen.append((path.name, None if image is None else int(image[0, 0, 0]), label))
            if len(seen) == 4:
                (tmp_path / "late_label5.pgm").write_bytes(b"P5 28 28 255\n" + pixels.tobytes())
            if len(seen) == 5:
                stop.set()

    thread = threading.Thread(target=consume)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    by_name = {name: (value, label) for name, value, label in seen}
    assert len(seen) == 5 == len(by_name)  # each file once
    assert by_name["broken.png"] == (None, None)
    assert by_name["s2_label2.pgm"] == (9, 2) and by_name["late_label5.pgm"] == (9, 5)


def test_watch_leaves_a_file_still_being_written(tmp_path: Path) -> None:
    (tmp_path / "fresh.pgm").write_bytes(b"P5 28 28 255\n" + bytes(784))
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    got = list(watch_directory(tmp_path, (1, 28, 28), stop, poll_s=0.05, settle_s=60))
    assert got == [] and time.monotonic() - started < 5


def _idx(path: Path, array: np.ndarray) -> None:
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_dataset_reader(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    (tmp_path / "toy").mkdir()
    _idx(tmp_path / "toy" / "t10k-images-idx3-ubyte.gz", images)
    _idx(tmp_path / "toy" / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    x, y = load_idx_dataset("toy", "test", limit=3, search=[str(tmp_path)])
    assert x.shape == (3, 1, 28, 28) and np.array_equal(x[:, 0], images[:3]) and list(y) == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="dataset 'other' not found"):
        load_idx_dataset("other", search=[str(tmp_path)])
    with pytest.raises(ValueError, match="split must be one of"):
        load_idx_dataset("toy", "validation", search=[str(tmp_path)])


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "dataset:fashion-mnist:test",
            ("dataset", {"name": "fashion-mnist", "split": "test", "limit": None}),
        ),
        (
            "dataset:fashion-mnist:train:50",
            ("dataset", {"name": "fashion-mnist", "split": "train", "limit": 50}),
        ),
        ("dir:/srv/inbox", ("dir", {"path": Path("/srv/inbox")})),
    ],
)
def test_parse_source(text: str, expected) -> None:
    assert parse_source(text) == expected


@pytest.mark.parametrize("text", ["dataset:fashion-mnist", "dataset:x:test:0", "dir:", "camera:0", "x"])
def test_parse_source_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="source"):
        parse_source(text)
