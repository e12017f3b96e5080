"""The OpenCV source of the classification agent (`video.sources.capture_images`, `edgecascade agent --source
file:...`): a small video written by cv2.VideoWriter here is read frame by frame, converted (grey or RGB) and
resized to the model card's input shape, and each frame becomes one result row."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from broker.launcher import BrokerProcess
from device_agent.cli import parse_source
from protocol.topics import Topics
from results_db import Collector, CollectorConfig
from video.sources import capture_images, to_model_input

REPO = Path(__file__).resolve().parent.parent
FRAMES = 24


def write_clip(path: Path, frames: int = FRAMES, size: tuple = (64, 48)) -> Path:
    """A colour clip (MJPG in AVI: every OpenCV build writes and reads it): frame i is BGR (10 i, 0, 200)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened()
    for i in range(frames):
        frame = np.zeros((size[1], size[0], 3), np.uint8)
        frame[:, :] = (10 * i, 0, 200)  # blue grows, red stays: grey and RGB tell them apart
        writer.write(frame)
    writer.release()
    return path


def test_frames_come_out_in_the_models_shape_grey_or_rgb(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.avi")
    fps, frames = capture_images(str(clip), (1, 28, 28))
    grey = list(frames)
    assert fps == pytest.approx(10.0) and len(grey) == FRAMES
    assert all(f.shape == (1, 28, 28) and f.dtype == np.uint8 and f.flags.c_contiguous for f in grey)
    # grey = 0.114 B + 0.299 R: red 200 -> ~60, plus a growing blue share (MJPG is lossy: +-6)
    assert abs(int(grey[0][0, 14, 14]) - 60) <= 6 and grey[-1].mean() > grey[0].mean() + 20
    _, frames = capture_images(str(clip), (3, 28, 28), max_frames=5)
    rgb = list(frames)
    assert len(rgb) == 5 and rgb[0].shape == (3, 28, 28)
    r, g, b = (int(rgb[4][c, 14, 14]) for c in range(3))
    assert abs(r - 200) <= 8 and g <= 8 and abs(b - 40) <= 8  # BGR became RGB


def test_to_model_input_takes_grey_and_bgra_pictures() -> None:
    assert to_model_input(np.full((10, 20), 7, np.uint8), (1, 5, 5)).shape == (1, 5, 5)
    assert to_model_input(np.full((10, 20), 7, np.uint8), (3, 5, 5))[2, 0, 0] == 7
    assert to_model_input(np.zeros((10, 20, 4), np.uint8), (1, 28, 28)).shape == (1, 28, 28)
    with pytest.raises(ValueError):
        to_model_input(np.zeros((10, 20), np.uint8), (2, 5, 5))


def test_the_agent_cli_parses_the_video_sources_like_the_camera() -> None:
    assert parse_source("file:/srv/belt.mp4") == ("video", {"target": "/srv/belt.mp4"})
    assert parse_source("camera:0") == ("video", {"target": 0})
    assert parse_source("url:rtsp://10.0.0.7/s1") == ("video", {"target": "rtsp://10.0.0.7/s1"})
    assert parse_source("gst:v4l2src ! appsink")[1] == {"target": "v4l2src ! appsink"}
    assert parse_source("mqtt") == ("mqtt", {})
    with pytest.raises(ValueError):
        parse_source("synthetic:/x")  # the camera agent's clips, not this agent's


@pytest.mark.integration
def test_each_frame_of_a_video_file_becomes_one_row(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, tmp_path: Path
) -> None:
    clip = write_clip(tmp_path / "clip.avi")
    db = tmp_path / "results.db"
    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    secret = tmp_path / "pw"
    secret.write_text(broker.credentials(device_id).password + "\n")
    collector = Collector(
        CollectorConfig(broker.credentials("collector"), topics, db, client_id=f"col-{uuid.uuid4().hex[:8]}")
    ).start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "edgecascade", "agent", "--broker", f"{broker.host}:{broker.port}",
             "--device-id", device_id, "--password-file", str(secret), "--models", str(tiny_models),
             "--policy", "edge-only", "--source", f"file:{clip}", "--state-dir", str(tmp_path / "state"),
             "--namespace", topics.root.split("/")[0], "--idle-seconds", "0", "--no-progress",
            ],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        collector.stop()
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["samples"] == FRAMES and summary["failed"] == 0
    with sqlite3.connect(db) as raw:
        rows = raw.execute(
            "SELECT COUNT(*), COUNT(DISTINCT seq), MAX(label) FROM inferences WHERE device_id = ?",
            (device_id,),
        ).fetchone()
        dataset = raw.execute("SELECT dataset FROM runs WHERE device_id = ?", (device_id,)).fetchone()
    assert rows == (FRAMES, FRAMES, None) and dataset == (f"file:{clip}",)
