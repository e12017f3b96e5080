"""Where samples come from: a dataset in IDX files, a directory watched for image files, or an array.

Everything here is numpy and the standard library: a device reads PNG (through zlib) and PGM itself instead of
pulling in Pillow. Images come out as uint8 CHW arrays; a label, when the source knows one, beside them.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

logger = logging.getLogger(__name__)

Sample = Tuple[np.ndarray, Optional[int]]
DATA_DIRS_ENV = "EDGECASCADE_DATA"
# Where `make setup` (Debian package dataset-fashion-mnist) and the training helper put the IDX files.
DEFAULT_DATA_DIRS = ("data", "/usr/share/datasets")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SUFFIXES = (".png", ".pgm", ".pnm")
_LABEL_IN_NAME = re.compile(r"(?:^|[_\-.])label[_\-]?(\d+)(?:[_\-.]|$)", re.IGNORECASE)


class ImageError(ValueError):
    """A file that is not an image this agent can read, or not the shape the model takes."""


# -- datasets --------------------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        data = fh.read()
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, body has {body.size} bytes")
    return body.reshape(dims)


def find_dataset_dir(name: str, search: Optional[Sequence[str]] = None) -> Path:
    """The directory holding `name`'s IDX files: $EDGECASCADE_DATA, ./data, /usr/share/datasets."""
    dirs: List[str] = list(search) if search is not None else []
    if search is None:
        if os.environ.get(DATA_DIRS_ENV):
            dirs += os.environ[DATA_DIRS_ENV].split(os.pathsep)
        dirs += list(DEFAULT_DATA_DIRS)
    for base in dirs:
        for candidate in (Path(base) / name, Path(base) / name / "raw", Path(base)):
            if any((candidate / (_IDX_FILES["test"][0] + ext)).exists() for ext in ("", ".gz")):
                return candidate
    raise FileNotFoundError(
        f"dataset {name!r} not found in {dirs} (set ${DATA_DIRS_ENV}, or `apt-get install dataset-{name}`)"
    )


def load_idx_dataset(
    name: str, split: str = "test", limit: Optional[int] = None, search: Optional[Sequence[str]] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N,1,H,W] and labels [N] of an MNIST-format dataset (mnist, fashion-mnist, ...)."""
    if split not in _IDX_FILES:
        raise ValueError(f"split must be one of {sorted(_IDX_FILES)}, got {split!r}")
    base = find_dataset_dir(name, search)
    arrays = []
    for stem in _IDX_FILES[split]:
        path = next((base / (stem + ext) for ext in (".gz", "") if (base / (stem + ext)).exists()), None)
        if path is None:
            raise FileNotFoundError(f"{base} lacks {stem}[.gz]")
        arrays.append(_read_idx(path))
    images, labels = arrays
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return np.ascontiguousarray(images[:, None, :, :]), labels.astype(np.int64)


def iter_dataset(
    name: str, split: str = "test", limit: Optional[int] = None, search: Optional[Sequence[str]] = None
) -> Iterator[Sample]:
    images, labels = load_idx_dataset(name, split, limit, search)
    for image, label in zip(images, labels):
        yield image, int(label)


# -- image files -----------------------------------------------------------------------------------------
def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> np.ndarray:
    """Undo PNG's per-row filters (spec section 9)."""
    rows = np.frombuffer(raw, dtype=np.uint8)
    if rows.size != height * (stride + 1):
        raise ImageError(f"PNG data has {rows.size} bytes, expected {height * (stride + 1)}")
    rows = rows.reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.int64)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(height):
        kind, line = int(rows[y, 0]), rows[y, 1:].astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: a running sum along each channel
            cur = np.zeros(stride, dtype=np.int64)
            for k in range(bpp):
                cur[k::bpp] = np.cumsum(line[k::bpp]) & 0xFF
        elif kind == 2:  # Up
            cur = (line + prev) & 0xFF
        elif kind in (3, 4):  # Average and Paeth depend on the reconstructed left neighbour: per pixel
            px, up, done = line.tolist(), prev.tolist(), [0] * stride
            for x in range(stride):
                left = done[x - bpp] if x >= bpp else 0
                up_left = up[x - bpp] if x >= bpp else 0
                pred = (left + up[x]) >> 1 if kind == 3 else _paeth(left, up[x], up_left)
                done[x] = (px[x] + pred) & 0xFF
            cur = np.array(done, dtype=np.int64)
        else:
            raise ImageError(f"unknown PNG filter type {kind}")
        out[y] = cur
        prev = cur
    return out.astype(np.uint8)


def decode_png(data: bytes) -> np.ndarray:
    """A non-interlaced 8-bit PNG (grey, grey+alpha, RGB, RGBA, palette) as uint8 [H, W, channels]."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ImageError("not a PNG file")
    pos, idat, header, palette = 8, [], None, None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if len(chunk) != length:
            raise ImageError("truncated PNG chunk")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"PLTE":
            palette = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise ImageError("PNG lacks IHDR or IDAT")
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color)
    if channels is None or depth != 8 or interlace != 0:
        raise ImageError(f"unsupported PNG (bit depth {depth}, colour type {color}, interlace {interlace})")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise ImageError(f"corrupt PNG data: {exc}") from exc
    pixels = _unfilter(raw, height, width * channels, channels).reshape(height, width, channels)
    if color == 3:
        if palette is None:
            raise ImageError("palette PNG without PLTE")
        pixels = palette[pixels[:, :, 0]]
    return pixels


def decode_pgm(data: bytes) -> np.ndarray:
    """A binary (P5) or ASCII (P2) PGM with maxval <= 255 as uint8 [H, W, 1]."""
    tokens: List[bytes] = []
    pos = 0
    while len(tokens) < 4:
        match = re.compile(rb"\s*(#[^\n]*\n\s*)*(\S+)").match(data, pos)
        if match is None:
            raise ImageError("truncated PGM header")
        tokens.append(match.group(2))
        pos = match.end()
    magic, width, height, maxval = tokens[0], *(int(t) for t in tokens[1:4])
    if magic not in (b"P5", b"P2") or not 0 < maxval <= 255:
        raise ImageError(f"unsupported PGM ({magic!r}, maxval {maxval})")
    if magic == b"P5":
        body = np.frombuffer(data[pos + 1 : pos + 1 + width * height], dtype=np.uint8)
    else:
        body = np.array(data[pos:].split()[: width * height], dtype=np.int64).astype(np.uint8)
    if body.size != width * height:
        raise ImageError(f"PGM body has {body.size} pixels, expected {width * height}")
    if maxval != 255:
        body = (body.astype(np.uint16) * 255 // maxval).astype(np.uint8)
    return body.reshape(height, width, 1)


def read_image(path: Path, input_shape: Sequence[int]) -> np.ndarray:
    """An image file as the uint8 CHW array the model takes (colour becomes grey for 1-channel models)."""
    data = Path(path).read_bytes()
    pixels = decode_png(data) if data[:4] == b"\x89PNG" else decode_pgm(data)
    channels, height, width = (int(d) for d in input_shape)
    if pixels.shape[2] in (2, 4):  # drop alpha
        pixels = pixels[:, :, :-1]
    if channels == 1 and pixels.shape[2] == 3:
        grey = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        pixels = np.clip(np.rint(grey), 0, 255).astype(np.uint8)[:, :, None]
    elif channels == 3 and pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    if pixels.shape != (height, width, channels):
        raise ImageError(
            f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}x{pixels.shape[2]}, "
            f"the model takes {width}x{height}x{channels}"
        )
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def label_from_name(path: Path) -> Optional[int]:
    """`label7`, `label-7` or `label_7` in a file name gives its label (for scoring a directory run)."""
    match = _LABEL_IN_NAME.search(Path(path).stem)
    return int(match.group(1)) if match else None


def watch_directory(
    directory: Path,
    input_shape: Sequence[int],
    stop: threading.Event,
    poll_s: float = 0.2,
    settle_s: float = 0.1,
) -> Iterator[Tuple[Path, Optional[np.ndarray], Optional[int]]]:
    """Yield (path, image, label) for each image file appearing in `directory`, once, oldest first, until
    `stop` is set. A file is read once its size and mtime have not changed for `settle_s` (writers still
    busy are left for the next scan). An unreadable image yields (path, None, None) and is logged."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    seen: Set[str] = set()
    while not stop.is_set():
        now = time.time()
        fresh = []
        with os.scandir(directory) as it:
            for entry in it:
                if entry.name in seen or not entry.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if now - st.st_mtime >= settle_s and entry.is_file():
                    fresh.append((st.st_mtime, entry.name))
        for _, name in sorted(fresh):
            seen.add(name)
            path = directory / name
            try:
                image = read_image(path, input_shape)
            except (ImageError, ValueError, OSError) as exc:
                logger.warning("skipping %s: %s", path, exc)
                yield path, None, None
                continue
            yield path, image, label_from_name(path)
            if stop.is_set():
                return
        stop.wait(poll_s)
