"""Sample sources of the agent: IDX datasets, image files (hostile ones too), the watched directory."""

from __future__ import annotations

import gzip
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device_agent.cli import parse_source
from device_agent.durable import SourceProgress, mark_done
from device_agent.outbox import Outbox
from device_agent.sources import (
    ImageError,
    label_from_name,
    load_idx_dataset,
    read_image,
    watch_directory,
)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png(width: int, height: int, color: int, data: bytes, palette: bytes = b"") -> bytes:
    """A PNG written chunk by chunk, so that tests can make the broken and hostile ones no encoder would."""
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0))
    if palette:
        png += _chunk(b"PLTE", palette)
    return png + _chunk(b"IDAT", zlib.compress(data)) + _chunk(b"IEND", b"")


def test_read_image_takes_what_pillow_and_others_write(tmp_path: Path) -> None:
    gradient = (np.add.outer(np.arange(28), np.arange(28)) * 4 % 256).astype(np.uint8)
    Image.fromarray(gradient, "L").save(tmp_path / "g.png", optimize=True)
    assert np.array_equal(read_image(tmp_path / "g.png", (1, 28, 28))[0], gradient)
    rgb = np.zeros((28, 28, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb, "RGB").save(tmp_path / "c.png")
    grey = read_image(tmp_path / "c.png", (1, 28, 28))
    assert grey.shape == (1, 28, 28) and grey.dtype == np.uint8 and abs(int(grey[0, 0, 0]) - 60) <= 1
    assert read_image(tmp_path / "c.png", (3, 28, 28))[:, 0, 0].tolist() == [200, 0, 0]
    # binary and ASCII PGM (a filter row per line, as PNG encoders write them, is Pillow's business)
    (tmp_path / "b.pgm").write_bytes(b"P5\n# a comment\n28 28\n255\n" + gradient.tobytes())
    assert np.array_equal(read_image(tmp_path / "b.pgm", (1, 28, 28))[0], gradient)
    ascii_pgm = b"P2 28 28 15\n" + b" ".join(str(v % 16).encode() for v in range(784))
    (tmp_path / "a.pgm").write_bytes(ascii_pgm)
    assert read_image(tmp_path / "a.pgm", (1, 28, 28))[0, 0, 15] == 255


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("gif.png", b"GIF89a" + bytes(100), "cannot read it as an image"),
        ("short-header.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00", "cannot read it"),
        ("corrupt.png", _png(28, 28, 0, b"")[:-30] + b"not zlib at all", "cannot read it"),
        ("truncated.png", _png(28, 28, 0, np.random.default_rng(0).bytes(28 * 29))[:300], "cannot read it"),
        ("small.pgm", b"P5 8 8 255\n" + bytes(64), "image is 8x8, the model takes 28x28"),
        ("short.pgm", b"P5 28 28 255\n" + bytes(5), "cannot read it"),
    ],
)
def test_bad_files_raise_image_error(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ImageError, match=message):
        read_image(tmp_path / name, (1, 28, 28))


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    # 8000 x 8000 grey = 64 MB of pixels in a 60 KB file; its header alone gets it refused
    rows = (b"\x00" + bytes(8000)) * 8000
    (tmp_path / "bomb.png").write_bytes(_png(8000, 8000, 0, rows))
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    with pytest.raises(ImageError, match="image is 8000x8000, the model takes 28x28"):
        read_image(tmp_path / "bomb.png", (1, 28, 28))


def test_a_palette_index_beyond_the_palette_is_no_crash(tmp_path: Path) -> None:
    rows = b"".join(b"\x00" + bytes([7] * 28) for _ in range(28))  # index 7, a palette of 2
    (tmp_path / "p.png").write_bytes(_png(28, 28, 3, rows, palette=bytes([0, 0, 0, 255, 255, 255])))
    try:
        image = read_image(tmp_path / "p.png", (1, 28, 28))
    except ImageError:
        return  # refused with our error: fine
    assert image.shape == (1, 28, 28) and image.dtype == np.uint8


def test_label_from_name() -> None:
    assert label_from_name(Path("img_0001_label7.png")) == 7
    assert label_from_name(Path("label-3.pgm")) == 3
    assert label_from_name(Path("cam-2024-01-01.png")) is None


def _consume(directory: Path, stop: threading.Event, progress=None, until: int = 0, on=None) -> list:
    """Found files of one watcher, until `until` of them (or `stop`)."""
    seen: list = []

    def run() -> None:
        for found in watch_directory(directory, (1, 28, 28), stop, progress, poll_s=0.02, settle_s=0.0):
            seen.append(found)
            if on is not None:
                on(seen)
            if len(seen) >= until:
                stop.set()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    return seen


def test_watch_yields_each_settled_file_once_and_flags_bad_ones(tmp_path: Path) -> None:
    pixels = np.full((28, 28), 9, dtype=np.uint8)
    for i in range(3):
        (tmp_path / f"s{i}_label{i}.pgm").write_bytes(b"P5 28 28 255\n" + pixels.tobytes())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG nonsense")
    (tmp_path / "notes.txt").write_text("ignored")

    def late(seen: list) -> None:
        if len(seen) == 4:
            (tmp_path / "late_label5.pgm").write_bytes(b"P5 28 28 255\n" + pixels.tobytes())

    seen = _consume(tmp_path, threading.Event(), until=5, on=late)
    by_name = {f.path.name: (None if f.image is None else int(f.image[0, 0, 0]), f.label) for f in seen}
    assert len(seen) == 5 == len(by_name)  # each file once
    assert by_name["broken.png"] == (None, None)
    assert by_name["s2_label2.pgm"] == (9, 2) and by_name["late_label5.pgm"] == (9, 5)


def test_hostile_files_are_skipped_and_the_watch_goes_on(tmp_path: Path) -> None:
    """A symlink to itself, a short PNG header, a decompression bomb: each skipped once, files after them
    still read (before, the first of them killed the agent and, under systemd, on every restart)."""
    (tmp_path / "a-loop.png").symlink_to(tmp_path / "a-loop.png")
    (tmp_path / "b-short.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "c-bomb.png").write_bytes(_png(8000, 8000, 0, (b"\x00" + bytes(8000)) * 8000))
    (tmp_path / "z-good_label1.pgm").write_bytes(b"P5 28 28 255\n" + bytes(784))
    seen = _consume(tmp_path, threading.Event(), until=4)
    assert sorted(f.path.name for f in seen if f.image is None) == ["a-loop.png", "b-short.png", "c-bomb.png"]
    assert [f.label for f in seen if f.image is not None] == [1]


def test_watch_remembers_across_restarts_what_is_done_and_forgets_what_is_gone(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("a_label0.pgm", "b_label1.pgm", "c_label2.pgm"):
        (inbox / name).write_bytes(b"P5 28 28 255\n" + bytes(784))
    (inbox / "bad.png").write_bytes(b"junk")
    box = Outbox(tmp_path / "outbox.sqlite")
    progress = SourceProgress(box, f"dir:{inbox}")
    first = _consume(inbox, threading.Event(), progress, until=4)
    assert len(first) == 4
    # the agent marks a file done with its record; c's record was still in memory when the process died
    done = [f.origin for f in first if f.image is not None and not f.path.name.startswith("c")]
    box.commit([], [], also=mark_done(done))
    box.close()

    box = Outbox(tmp_path / "outbox.sqlite")  # the next process
    progress = SourceProgress(box, f"dir:{inbox}")
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    again = _consume(inbox, stop, progress, until=99)
    assert [f.path.name for f in again] == ["c_label2.pgm"]  # redone; the bad file is not read again
    (inbox / "a_label0.pgm").write_bytes(b"P5 28 28 255\n" + bytes([1]) * 784)  # rewritten: new
    (inbox / "b_label1.pgm").unlink()
    third = _consume(inbox, threading.Event(), progress, until=2)
    assert sorted(f.path.name for f in third) == ["a_label0.pgm", "c_label2.pgm"]
    assert "b_label1.pgm" not in progress.done()  # gone from the directory: forgotten


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


@pytest.mark.parametrize(
    "text", ["dataset:fashion-mnist", "dataset:x:test:0", "dir:", "webcam:0", "camera:", "x"]
)
def test_parse_source_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="source"):
        parse_source(text)
