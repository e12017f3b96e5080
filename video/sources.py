"""Where a camera agent's frames come from: generated clips on disk, or a real video through OpenCV.

Either way frames come out as uint8 grey [H, W] at the model's input size (`card.json` `input.shape`), in
clips: `(clip index, frames)`, frames being an array or a lazy iterator. `VideoCapture` takes a video file,
an RTSP/HTTP URL, a camera index or (on a Jetson) a GStreamer pipeline string; colour becomes grey and the
picture is resized (area interpolation) to what the edge detector takes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)


def parse_video_source(text: str) -> Tuple[str, str]:
    """`synthetic:DIR`, `file:PATH`, `url:URL`, `camera:N` or `gst:PIPELINE` -> (kind, rest)."""
    kind, _, rest = text.partition(":")
    if kind in ("synthetic", "file", "url", "camera", "gst") and rest:
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


def capture_frames(
    source: Union[str, int], size: Tuple[int, int], max_frames: Optional[int] = None
) -> Tuple[float, Iterator[np.ndarray]]:
    """(fps, grey frames [H, W] of `size`) from OpenCV; ValueError when the source cannot be opened."""
    import cv2

    capture = (
        cv2.VideoCapture(source, cv2.CAP_GSTREAMER)
        if isinstance(source, str) and "!" in source
        else cv2.VideoCapture(source)
    )
    if not capture.isOpened():
        raise ValueError(f"OpenCV cannot open video source {source!r}")
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0) or 30.0
    height, width = size

    def frames() -> Iterator[np.ndarray]:
        taken = 0
        try:
            while max_frames is None or taken < max_frames:
                ok, picture = capture.read()
                if not ok:
                    return
                if picture.ndim == 3:
                    picture = cv2.cvtColor(picture, cv2.COLOR_BGR2GRAY)
                if picture.shape != (height, width):
                    picture = cv2.resize(picture, (width, height), interpolation=cv2.INTER_AREA)
                taken += 1
                yield np.ascontiguousarray(picture, dtype=np.uint8)
        finally:
            capture.release()

    return fps, frames()
