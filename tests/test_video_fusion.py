"""REACT fusion rules on hand cases: match, class from the cloud, stale decay, unmatched add, IoU < 0.5."""

from __future__ import annotations

import numpy as np
import pytest

from video.detector import Detections
from video.fusion import FusionConfig, ReactFusion, match


def dets(*rows: tuple) -> Detections:
    """rows of (x1, y1, x2, y2, score, label)."""
    a = np.array(rows, dtype=np.float32).reshape(-1, 6)
    return Detections(a[:, :4], a[:, 4], a[:, 5].astype(np.int64), [])


def test_matched_pair_keeps_the_edge_box_and_takes_the_cloud_class_and_score() -> None:
    f = ReactFusion()
    f.on_edge(10, dets((10, 10, 40, 40, 0.6, 3)))
    f.on_cloud(10, dets((12, 12, 42, 42, 0.9, 4)))  # IoU 0.77 with the edge box
    out = f.output(10)
    assert out.source == "fused" and out.detections.sources == ["fused"]
    np.testing.assert_allclose(out.detections.boxes[0], [10, 10, 40, 40])
    assert out.detections.labels[0] == 4 and out.detections.scores[0] == pytest.approx(0.9)


def test_cloud_class_sticks_to_the_track_through_later_edge_runs_and_tracking() -> None:
    f = ReactFusion()
    f.on_edge(0, dets((10, 10, 40, 40, 0.6, 3)))
    f.on_cloud(1, dets((10, 10, 40, 40, 0.9, 4)))
    f.on_tracked(2, np.array([[12, 10, 42, 40]], np.float32), np.array([True]))
    f.on_edge(5, dets((14, 10, 44, 40, 0.5, 3)))
    out = f.output(5)
    np.testing.assert_allclose(out.detections.boxes[0], [14, 10, 44, 40])
    assert (out.detections.labels[0], out.detections.sources[0], out.source) == (4, "fused", "edge")


def test_unmatched_cloud_box_is_added() -> None:
    f = ReactFusion()
    f.on_edge(0, dets((10, 10, 40, 40, 0.6, 3)))
    f.on_cloud(0, dets((80, 80, 100, 110, 0.7, 8)))
    out = f.output(0)
    assert sorted(out.detections.sources) == ["cloud", "edge"]
    assert set(out.detections.labels.tolist()) == {3, 8}


def test_pairs_below_iou_half_are_not_matched() -> None:
    f = ReactFusion()
    f.on_edge(0, dets((0, 0, 20, 20, 0.6, 1)))
    f.on_cloud(0, dets((10, 0, 30, 20, 0.9, 2)))  # IoU 1/3
    out = f.output(0)
    assert len(out.detections) == 2 and sorted(out.detections.sources) == ["cloud", "edge"]
    assert match(np.array([[0, 0, 20, 20]], np.float32), np.array([[10, 0, 30, 20]], np.float32), 0.5) == []
    # IoU just above 0.5 (20x20 against 20x14 inside it: 0.7) is matched
    assert match(np.array([[0, 0, 20, 20]], np.float32), np.array([[0, 0, 20, 14]], np.float32), 0.5) == [
        (0, 0)
    ]


def test_assignment_is_one_to_one_and_maximises_iou() -> None:
    a = np.array([[0, 0, 10, 10], [2, 0, 12, 10]], np.float32)
    b = np.array([[2, 0, 12, 10], [0, 0, 10, 10]], np.float32)
    assert sorted(match(a, b, 0.5)) == [(0, 1), (1, 0)]


def test_unconfirmed_boxes_decay_per_frame_and_are_dropped() -> None:
    f = ReactFusion(FusionConfig(decay=0.8, drop_below=0.3))
    f.on_edge(0, dets((10, 10, 40, 40, 0.8, 3)))
    f.on_edge(5, Detections.empty())  # the edge no longer sees it: held, decaying from frame 5
    assert f.output(5).detections.scores[0] == pytest.approx(0.8 * 0.8)
    assert f.output(6).detections.scores[0] == pytest.approx(0.8 * 0.8**2)
    assert f.output(7).detections.scores[0] == pytest.approx(0.8 * 0.8**3)  # 0.41
    assert f.output(8).detections.scores[0] == pytest.approx(0.8 * 0.8**4)  # 0.33
    assert len(f.output(9).detections) == 0  # 0.26 < 0.3: dropped
    assert len(f.output(8).detections) == 0  # and gone for good
    f2 = ReactFusion(FusionConfig(decay=0.8, drop_below=0.3))
    f2.on_edge(0, dets((10, 10, 40, 40, 0.8, 3)))
    f2.on_edge(5, Detections.empty())
    f2.on_cloud(6, dets((10, 10, 40, 40, 0.9, 3)))  # confirmed again by the cloud: no more decay
    assert f2.output(12).detections.scores[0] == pytest.approx(0.9)


def test_unconfirmed_cloud_box_decays_after_the_next_edge_run() -> None:
    f = ReactFusion(FusionConfig(decay=0.5, drop_below=0.05))
    f.on_cloud(3, dets((50, 50, 70, 70, 0.8, 2)))
    assert f.output(4).detections.scores[0] == pytest.approx(0.8)
    f.on_edge(5, Detections.empty())
    assert f.output(5).detections.scores[0] == pytest.approx(0.4)
    assert f.output(6).detections.scores[0] == pytest.approx(0.2)


def test_tracker_moves_boxes_and_a_lost_box_stops_being_confirmed() -> None:
    f = ReactFusion(FusionConfig(decay=0.5))
    f.on_edge(0, dets((10, 10, 40, 40, 0.8, 3), (60, 60, 90, 90, 0.8, 1)))
    f.on_tracked(1, np.array([[11, 10, 41, 40], [60, 61, 90, 91]], np.float32), np.array([True, False]))
    out = f.output(1)
    assert out.source == "tracked" and out.detections.sources == ["tracked", "tracked"]
    assert out.detections.scores.tolist() == pytest.approx([0.8, 0.4])
    with pytest.raises(ValueError):
        f.on_tracked(2, np.zeros((1, 4), np.float32), np.array([True]))


def test_a_held_box_overlapping_a_fresh_edge_box_is_replaced_not_duplicated() -> None:
    f = ReactFusion()
    f.on_edge(0, dets((10, 10, 40, 40, 0.8, 3), (12, 10, 42, 40, 0.7, 5)))  # two tracks, one object
    f.on_edge(5, dets((11, 10, 41, 40, 0.9, 3)))
    assert len(f.output(5).detections) == 1


def test_fusion_config_is_validated() -> None:
    with pytest.raises(ValueError):
        FusionConfig(iou_threshold=0)
    with pytest.raises(ValueError):
        FusionConfig(decay=1.5)


def test_late_unmatched_cloud_boxes_and_tracks_the_cloud_misses_rank_lower() -> None:
    f = ReactFusion(FusionConfig(cloud_age_decay=0.9, cloud_miss_factor=0.5))
    f.on_edge(10, dets((10, 10, 40, 40, 0.6, 3)))
    f.on_cloud(10, dets((80, 80, 100, 110, 0.8, 8)), age_frames=3)  # answer for frame 7, nothing matched
    out = f.output(10)
    by_source = dict(zip(out.detections.sources, out.detections.scores.tolist()))
    assert by_source["cloud"] == pytest.approx(0.8 * 0.9**3)
    assert by_source["edge"] == pytest.approx(0.6 * 0.5)
