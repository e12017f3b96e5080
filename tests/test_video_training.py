"""Smoke run of detector training (--quick) and publishing: uint8-input ONNX, the card, the device decoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("pycocotools")

from device_agent.sources import FASHION_MNIST_CLASSES  # noqa: E402
from video.dataset import write_split  # noqa: E402
from video.synth import SynthConfig  # noqa: E402


def test_quick_training_then_publish_gives_a_card_and_working_onnx(tmp_path: Path) -> None:
    from test_video_synth import _sprites

    from training.detection import main
    from video.detector import Detector

    images, labels = _sprites()
    config = SynthConfig(frames=8)
    names = FASHION_MNIST_CLASSES
    write_split(tmp_path / "train", "train", 2, config, 0, images, labels, class_names=names)
    write_split(tmp_path / "test", "test", 1, config, 0, images, labels, class_names=names)
    ckpt = tmp_path / "ckpt"
    args = ["train", "--kind", "both", "--quick", "--train", str(tmp_path / "train"), "--ckpt-dir", str(ckpt)]
    assert main(args) == 0
    out = tmp_path / "models"
    publish = ["publish", "--edge", str(ckpt / "edge.pt"), "--cloud", str(ckpt / "cloud.pt")]
    assert main([*publish, "--test", str(tmp_path / "test"), "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["input"]["dtype"] == "uint8" and len(card["classes"]) == 10
    assert card["models"]["cloud"]["macs"] >= 10 * card["models"]["edge"]["macs"]
    for kind in ("edge", "cloud"):
        entry = card["models"][kind]
        assert len(entry["sha256"]) == 64 and 0 <= entry["map50"] <= 1
        detector = Detector.from_card(out, kind)
        dets = detector.detect_batch(np.zeros((3, 128, 128), np.uint8))
        assert len(dets) == 3 and all(d.boxes.shape[1] == 4 for d in dets)
