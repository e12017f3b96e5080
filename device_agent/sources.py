"""Where samples come from: a dataset in IDX files, a directory watched for image files, or an array; the
decoder of image files and of images received as messages (`decode_image`: `mqtt_input`).

Images come out as uint8 CHW arrays; a label, when the source knows one, beside them. Image files are decoded
by Pillow, which reads a file's header before it decodes anything: a file whose header does not announce the
model's size is refused before a byte is decompressed (a 249 KB PNG can announce gigabytes of pixels).
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from device_agent.durable import Origin, SourceProgress

logger = logging.getLogger(__name__)

Sample = Tuple[np.ndarray, Optional[int]]
DATA_DIRS_ENV = "EDGECASCADE_DATA"
# Where `make setup` (Debian package dataset-fashion-mnist) and the training helper put the IDX files.
DEFAULT_DATA_DIRS = ("data", "/usr/share/datasets")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The ten Fashion-MNIST classes, label order (the dataset's own documentation): the one list every task uses.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = (".png", ".pgm", ".pnm")
IMAGE_FORMATS = ("PNG", "PPM")  # Pillow's names; PPM covers PGM and PNM
PAYLOAD_FORMATS = ("PNG", "PPM", "JPEG")  # what cameras and sensors publish (`decode_image`)
MAX_FILE_BYTES = 16 * 1024 * 1024  # a model input is kilobytes: anything this big is not one
_LABEL_IN_NAME = re.compile(r"(?:^|[_\-.])label[_\-]?(\d+)(?:[_\-.]|$)", re.IGNORECASE)


class ImageError(ValueError):
    """A file that is not an image this agent can read, or not the shape the model takes."""


class ImageSizeError(ImageError):
    """An image whose header announces another size than the model takes (nothing was decoded)."""


# -- datasets --------------------------------------------------------------------------------------------
def parse_idx(data: bytes, what: str = "IDX data") -> np.ndarray:
    """An IDX file's array (the MNIST format: 0x0000, 0x08 = unsigned bytes, ndim, big-endian dims)."""
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{what} is not an IDX file of unsigned bytes")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{what}: its header is cut short ({len(data)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{what}: header says {dims}, body has {body.size} bytes")
    return body.reshape(dims)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        return parse_idx(fh.read(), str(path))


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
def read_image(path: Path, input_shape: Sequence[int]) -> np.ndarray:
    """An image file as the uint8 CHW array the model takes (colour becomes grey for 1-channel models).

    ImageError for anything else: not a PNG/PGM, truncated or corrupt, bigger than `MAX_FILE_BYTES`, or a
    header that announces another size than the model's (checked before decoding)."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise ImageError(f"{path}: cannot read it as an image ({type(exc).__name__}: {exc})") from None
    if size > MAX_FILE_BYTES:
        raise ImageError(f"{path}: {size} bytes, more than {MAX_FILE_BYTES}")
    return _decode(path, str(path), input_shape, IMAGE_FORMATS)[0]


@dataclass(frozen=True)
class Decoded:
    """An image from a message: the model's input and the label its sender put in it, if any."""

    image: np.ndarray
    label: Optional[int]


def decode_image(
    data: bytes,
    input_shape: Sequence[int],
    what: str = "image",
    formats: Sequence[str] = PAYLOAD_FORMATS,
    dtype: Any = np.uint8,
) -> Decoded:
    """An encoded image (PNG, PGM/PPM, JPEG) received as bytes, checked as `read_image` checks a file; a PNG's
    `label` text chunk (`label=7`) is its label, like `label7` in a watched file's name. A `.npy` payload is
    a raw sample of any card's input (a sensor's int16 window [channels, samples]): `decode_tensor`."""
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"{what}: {len(data)} bytes, more than {MAX_FILE_BYTES}")
    if data[: len(NPY_MAGIC)] == NPY_MAGIC:
        return Decoded(decode_tensor(data, input_shape, dtype, what), None)
    pixels, info = _decode(io.BytesIO(data), what, input_shape, formats)
    label = info.get("label")
    if label is not None and not (isinstance(label, str) and label.isdigit()):
        raise ImageError(f"{what}: its label {label!r} is not a class number")
    return Decoded(pixels, None if label is None else int(label))


NPY_MAGIC = b"\x93NUMPY"


def decode_tensor(data: bytes, input_shape: Sequence[int], dtype: Any, what: str = "sample") -> np.ndarray:
    """A `.npy` payload (numpy's format, never pickles) holding exactly one sample of `dtype` and
    `input_shape` (or [1, *input_shape]); its header is checked before a byte of the body is read.
    ImageSizeError for another shape, ImageError for anything else."""
    want = np.dtype(dtype)
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, got = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, got = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"npy version {version}")
    except ValueError as exc:
        raise ImageError(f"{what}: not a readable .npy sample ({exc})") from None
    if got != want or fortran:
        raise ImageError(
            f"{what}: a {'Fortran-order ' if fortran else ''}{got} array, the model takes {want}"
        )
    if tuple(shape) not in (tuple(input_shape), (1, *input_shape)):
        raise ImageSizeError(f"{what}: shape {list(shape)}, the model takes {list(input_shape)}")
    body = data[stream.tell() :]
    if len(body) != want.itemsize * int(np.prod(input_shape)):
        raise ImageError(f"{what}: {len(body)} bytes of data for a {list(shape)} {want} array")
    return np.frombuffer(body, dtype=want).reshape(tuple(input_shape)).copy()


def _decode(
    source: Union[Path, BinaryIO], what: str, input_shape: Sequence[int], formats: Sequence[str]
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """(uint8 CHW pixels, the header's info) of an image whose header announces the model's size."""
    channels, height, width = (int(d) for d in input_shape)
    try:
        with Image.open(source, formats=list(formats)) as image:
            if image.size != (width, height):
                raise ImageSizeError(
                    f"{what}: image is {image.size[0]}x{image.size[1]}, the model takes {width}x{height}"
                )
            info = {str(k): v for k, v in image.info.items()}
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        IndexError,
        struct.error,
        Image.DecompressionBombError,
    ) as exc:
        # Pillow's errors for unreadable, truncated and corrupt files, and ours for unreadable paths
        raise ImageError(f"{what}: cannot read it as an image ({type(exc).__name__}: {exc})") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)), info


def label_from_name(path: Path) -> Optional[int]:
    """`label7`, `label-7` or `label_7` in a file name gives its label (for scoring a directory run)."""
    match = _LABEL_IN_NAME.search(Path(path).stem)
    return int(match.group(1)) if match else None


@dataclass
class Found:
    """One file of a watched directory: its image and label, or None for a file that cannot be read."""

    path: Path
    image: Optional[np.ndarray]
    label: Optional[int] = None
    origin: Optional[Origin] = None  # mark it done with its record (the watcher's progress)


RECONCILE_S = 30.0  # how often the remembered files are checked against the directory on disk
UNREADABLE = "unreadable"  # the stamp of an entry that cannot even be stat()ed (a symlink loop)


def watch_directory(
    directory: Path,
    input_shape: Sequence[int],
    stop: threading.Event,
    progress: Optional[SourceProgress] = None,
    poll_s: float = 0.2,
    settle_s: float = 0.1,
) -> Iterator[Found]:
    """Yield each image file appearing in `directory`, once, oldest first, until `stop` is set.

    A file is read once its size and mtime have not changed for `settle_s` (writers still busy are left for
    the next scan). "Once" holds across restarts with a `progress`: a file is done when its record is on
    disk (the caller marks `Found.origin` with it) or, unreadable, when it was skipped — so a bad file is
    logged and yielded with `image=None` once, and never read again (no crash loop under systemd). A file
    rewritten under the same name (another mtime or size) is new. What is remembered is what is in the
    directory: names that disappear are forgotten, so the state is bounded by the directory itself."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    done: Dict[str, str] = progress.done() if progress is not None else {}

    def skip(path: Path, stamp: str, why: object) -> Found:
        logger.warning("skipping %s: %s", path, why)
        done[path.name] = stamp
        if progress is not None:
            progress.mark_now(path.name, stamp)
        return Found(path, None)

    reconciled = time.monotonic()
    while not stop.is_set():
        now = time.time()
        fresh: List[Tuple[int, str, str]] = []
        present = set()
        with os.scandir(directory) as it:
            for entry in it:
                if not entry.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                present.add(entry.name)
                try:
                    st = entry.stat()  # follows symlinks: a loop or a dangling link raises
                except OSError as exc:
                    if done.get(entry.name) != UNREADABLE:
                        yield skip(directory / entry.name, UNREADABLE, exc)
                    continue
                stamp = f"{st.st_mtime_ns}:{st.st_size}"
                if done.get(entry.name) == stamp or not entry.is_file():
                    continue
                if now - st.st_mtime >= settle_s:
                    fresh.append((st.st_mtime_ns, entry.name, stamp))
        gone = [name for name in done if name not in present]
        for name in gone:
            del done[name]
        if progress is not None:
            progress.forget(gone)
            if time.monotonic() - reconciled >= RECONCILE_S:
                # A file deleted while its offload was out is marked done again when its record lands:
                # what is on disk, not only what is in `done`, must follow the directory.
                reconciled = time.monotonic()
                progress.forget([name for name in progress.done() if name not in present])
        for _, name, stamp in sorted(fresh):
            path = directory / name
            try:
                image = read_image(path, input_shape)
            except ImageError as exc:
                yield skip(path, stamp, exc)
                continue
            done[name] = stamp
            origin = progress.origin(name, stamp) if progress is not None else None
            yield Found(path, image, label_from_name(path), origin)
            if stop.is_set():
                return
        stop.wait(poll_s)
