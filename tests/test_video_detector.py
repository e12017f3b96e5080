"""The device-side detector pieces: numpy decode + class-wise NMS, the LK tracker, the device loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cloud_worker.model import CloudSession, ModelError
from cloud_worker.tasks import Detect
from video.detector import Detections, Detector, DetectorError, box_iou, decode, nms_classwise
from video.pipeline import DeviceLoop, LoopConfig
from video.tracking import FlowTracker, forward_boxes

REPO = Path(__file__).resolve().parent.parent
VIDEO_MODELS = REPO / "models" / "video-fmnist"
# A provider onnxruntime knows of but this host lacks (CUDA on a CPU-only machine)
MISSING_PROVIDER = next(p for p in ort.get_all_providers() if p not in ort.get_available_providers())


def test_box_iou_and_classwise_nms() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [50, 50, 60, 60]], np.float32)
    assert box_iou(boxes[:1], boxes[1:2])[0, 0] == np.float32(90 / 110)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    labels = np.array([0, 0, 1, 0])
    # box 1 overlaps box 0 of its class and goes; box 2 is of another class and stays
    assert nms_classwise(boxes, scores, labels, 0.5).tolist() == [0, 2, 3]


def test_decode_thresholds_peaks_and_gathers_their_boxes() -> None:
    peaks = np.zeros((10, 4, 4), np.float32)
    peaks[3, 1, 2] = 0.9
    peaks[7, 3, 0] = 0.04  # below the threshold
    boxes = np.zeros((4, 4, 4), np.float32)
    boxes[:, 1, 2] = [10, 20, 30, 40]
    out = decode(peaks, boxes, score_threshold=0.05, image_size=[32, 32])
    assert out.labels.tolist() == [3] and out.scores.tolist() == [np.float32(0.9)]
    np.testing.assert_allclose(out.boxes, [[10, 20, 30, 32]])  # clipped to the frame


def _blob_frames(shift_px: int = 2, n: int = 6) -> list:
    rng = np.random.default_rng(0)
    texture = (rng.uniform(0, 255, (24, 24))).astype(np.uint8)
    frames = []
    for t in range(n):
        f = np.full((96, 96), 40, np.uint8)
        f[30 : 30 + 24, 20 + shift_px * t : 44 + shift_px * t] = texture
        frames.append(f)
    return frames


def test_flow_tracker_follows_a_moving_textured_patch() -> None:
    frames = _blob_frames()
    tracker = FlowTracker()
    box = np.array([[20, 30, 44, 54]], np.float32)
    moved, ok = tracker.track(frames[0], frames[1], box)
    assert ok.all()
    np.testing.assert_allclose(moved, [[22, 30, 46, 54]], atol=0.5)
    carried, ok = forward_boxes(frames, box, tracker, step=2)
    assert ok.all()
    np.testing.assert_allclose(carried, [[30, 30, 54, 54]], atol=1.0)


def test_device_loop_runs_the_detector_every_k_and_fuses_late_cloud_answers() -> None:
    frames = _blob_frames(n=12)
    calls = []

    def detect(i: int, _frame: np.ndarray) -> Detections:
        calls.append(i)
        x = 20 + 2 * i
        return Detections(
            np.array([[x, 30, x + 24, 54]], np.float32), np.array([0.6], np.float32), np.array([1])
        )

    loop = DeviceLoop(detect, config=LoopConfig(detect_every=5))
    sources = []
    for t, f in enumerate(frames):
        if t == 4:  # the answer for frame 0, with another class
            cloud = Detections(
                np.array([[20, 30, 44, 54]], np.float32), np.array([0.9], np.float32), np.array([7])
            )
            loop.on_cloud_answer(0, cloud)
        out = loop.process(t, f)
        sources.append(out.source)
        if loop.want_offload(t):
            loop.mark_sent(t)
    assert calls == [0, 5, 10]
    assert sources[:6] == ["edge", "tracked", "tracked", "tracked", "fused", "edge"]
    assert out.detections.labels.tolist() == [7]  # the cloud's class stuck to the track
    np.testing.assert_allclose(out.detections.boxes[0], [42, 30, 66, 54], atol=1.0)
    assert loop.in_flight == 4  # the next frame went out once the answer was back


def test_a_provider_the_host_lacks_is_refused_not_quietly_the_cpu(tiny_models: Path) -> None:
    """onnxruntime falls back to the CPU with a log line; the detector refuses, as the cloud model does."""
    with pytest.raises(DetectorError, match=f"none of the providers .*{MISSING_PROVIDER}"):
        Detector(VIDEO_MODELS / "edge.onnx", providers=[MISSING_PROVIDER])
    with pytest.raises(ModelError, match=f"none of the providers .*{MISSING_PROVIDER}"):
        CloudSession(tiny_models / "cloud.onnx", providers=[MISSING_PROVIDER])
    # One that is there among those asked for is used, the others skipped.
    detector = Detector(VIDEO_MODELS / "edge.onnx", providers=[MISSING_PROVIDER, "CPUExecutionProvider"])
    assert detector.session.get_providers() == ["CPUExecutionProvider"]


def test_a_directory_that_holds_no_detector_is_refused_with_the_reason(tmp_path: Path) -> None:
    """Before: KeyError 'models' for a classification model directory, FileNotFoundError for a missing one."""
    cases = {
        REPO / "models" / "fashion-mnist": "has no models: not a video detector's card",
        tmp_path / "nowhere": "does not exist",
        tmp_path: "has no card.json",
    }
    for model_dir, reason in cases.items():
        with pytest.raises(DetectorError, match=reason):
            Detector.from_card(model_dir, "cloud")
        # The cloud worker's task turns it into the ModelError its CLI reports in one line.
        with pytest.raises(ModelError, match=reason):
            Detect(model_dir)
    copy = tmp_path / "copy"
    shutil.copytree(VIDEO_MODELS, copy)
    card = json.loads((copy / "card.json").read_text())
    (copy / "cloud.onnx").write_bytes(b"not the model")
    with pytest.raises(DetectorError, match="does not match the sha256"):
        Detector.from_card(copy, "cloud")
    del card["decoding"]["nms_iou"]
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(DetectorError, match="has no decoding.nms_iou"):
        Detector.from_card(copy, "edge")
