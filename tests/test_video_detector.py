"""The device-side detector pieces: numpy decode + class-wise NMS, the LK tracker, the device loop."""

from __future__ import annotations

import numpy as np

from video.detector import Detections, box_iou, decode, nms_classwise
from video.pipeline import DeviceLoop, LoopConfig
from video.tracking import FlowTracker, forward_boxes


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
