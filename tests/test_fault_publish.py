"""training.fault_publish: the spread of a calibrated share over the validation recordings, and the committed
card's calibration record (targets below the caps, the margin stated, the command that made it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.fault_publish import share_sd_by_recording

CARD = Path(__file__).resolve().parents[1] / "models" / "vibration" / "card.json"


def test_a_share_spreads_more_when_a_recordings_windows_go_together() -> None:
    recording = np.repeat(np.arange(400), 3)
    together = np.repeat(np.arange(400) % 5 == 0, 3)  # 20 %: whole recordings
    apart = np.arange(1200) % 5 == 0  # 20 %: one window in five, spread over recordings
    sd_together = share_sd_by_recording(together, recording)
    assert sd_together == pytest.approx(np.sqrt(0.2 * 0.8 / 400), rel=0.1)  # 400 draws, not 1,200
    assert share_sd_by_recording(apart, recording) < 0.75 * sd_together


def test_the_card_aims_below_the_targets_and_says_by_how_much() -> None:
    thresholds = json.loads(CARD.read_text())["thresholds"]
    assert thresholds["target_sensor_offload"] < 0.20 and thresholds["target_cloud_fraction"] < 0.05
    assert "lowered" in thresholds["margin"] and thresholds["command"].startswith("python -m training.")
    assert set(thresholds["validation_sd_by_recording"]) == {"left_sensor", "reached_cloud"}
