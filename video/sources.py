"""Where a camera agent's frames come from: generated clips on disk, or a real video through OpenCV.

Either way frames come out as uint8 grey [H, W] at the model's input size (`card.json` `input.shape`), in
clips: `(clip index, frames)`, frames being an array or a lazy iterator. `VideoCapture` takes a video file,
an RTSP/HTTP URL, a camera index or (on a Jetson) a GStreamer pipeline string; colour becomes grey (or RGB,
for a 3-channel model) and the picture is resized (area interpolation) to what the model takes. The
classification agent reads the same sources (`edgecascade agent --source file:...`, `capture_images`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)


VIDEO_KINDS = ("synthetic", "file", "url", "camera", "gst")


def parse_video_source(text: str) -> Tuple[str, str]:
    """`synthetic:DIR`, `file:PATH`, `url:URL`, `camera:N` or `gst:PIPELINE` -> (kind, rest)."""
    kind, _, rest = text.partition(":")
    if kind in VIDEO_KINDS and rest:
        if kind == "camera" and not rest.isdigit():
            raise ValueError(f"camera:N takes a device index, got {text!r}")
        return kind, rest
    raise ValueError(
        f"--source must be synthetic:DIR, file:PATH, url:URL, camera:N or gst:PIPELINE, got {text!r}"
    )


def synthetic_clips(
    root: Union[str, Path], clips: Optional[int] = None
) -> Tuple[float, Iterator[Tuple[int, np.ndarray]]]:
    """(fps, clips) of a generated split (`edgecascade video make`)."""
    from video.dataset import load_split

    split = load_split(Path(root))
    count = split.sequences if clips is None else min(clips, split.sequences)
    return split.fps, ((c, split.frames(c)) for c in range(count))


def capture_target(kind: str, where: str) -> Union[str, int]:
    """What `cv2.VideoCapture` takes for a parsed `file:`, `url:`, `camera:` or `gst:` source."""
    if kind == "synthetic":
        raise ValueError("a synthetic source is read by synthetic_clips, not OpenCV")
    return int(where) if kind == "camera" else where


def to_model_input(picture: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """An OpenCV picture (BGR [H, W, 3], or grey [H, W]) as the uint8 CHW array a model takes: grey for 1
    channel, RGB for 3, resized with area interpolation to the card's `input.shape`."""
    import cv2

    channels, height, width = (int(d) for d in input_shape)
    if channels not in (1, 3):
        raise ValueError(f"a model input of {channels} channels is neither grey nor RGB")
    if picture.ndim == 3 and picture.shape[2] == 4:
        picture = cv2.cvtColor(picture, cv2.COLOR_BGRA2BGR)
    if channels == 1 and picture.ndim == 3:
        picture = cv2.cvtColor(picture, cv2.COLOR_BGR2GRAY)
    elif channels == 3:
        picture = cv2.cvtColor(picture, cv2.COLOR_GRAY2RGB if picture.ndim == 2 else cv2.COLOR_BGR2RGB)
    if picture.shape[:2] != (height, width):
        picture = cv2.resize(picture, (width, height), interpolation=cv2.INTER_AREA)
    if picture.ndim == 2:
        picture = picture[:, :, None]
    return np.ascontiguousarray(picture.transpose(2, 0, 1), dtype=np.uint8)


def capture_images(
    source: Union[str, int], input_shape: Sequence[int], max_frames: Optional[int] = None
) -> Tuple[float, Iterator[np.ndarray]]:
    """(fps, frames as the model's uint8 CHW input) from OpenCV: a video file, an RTSP/HTTP URL, a camera
    index or a GStreamer pipeline (a string with `!`); ValueError when the source cannot be opened. Frames are
    read as they are asked for: a consumer slower than a file reads it slower; a live camera's driver drops
    what nobody read."""
    import cv2

    capture = (
        cv2.VideoCapture(source, cv2.CAP_GSTREAMER)
        if isinstance(source, str) and "!" in source
        else cv2.VideoCapture(source)
    )
    if not capture.isOpened():
        raise ValueError(f"OpenCV cannot open video source {source!r}")
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0) or 30.0

    def frames() -> Iterator[np.ndarray]:
        taken = 0
        try:
            while max_frames is None or taken < max_frames:
                ok, picture = capture.read()
                if not ok:
                    return
                taken += 1
                yield to_model_input(picture, input_shape)
        finally:
            capture.release()

    return fps, frames()


def capture_frames(
    source: Union[str, int], size: Tuple[int, int], max_frames: Optional[int] = None
) -> Tuple[float, Iterator[np.ndarray]]:
    """(fps, grey frames [H, W] of `size`) from OpenCV (`capture_images` for a 1-channel model)."""
    fps, images = capture_images(source, (1, *size), max_frames)
    return fps, (image[0] for image in images)
