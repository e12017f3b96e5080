"""The tiny test models honour the model-directory contract (names, dtypes, dynamic batch, card hashes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tinymodels import tiny_images, write_tiny_model_dir


def test_tiny_model_dir_follows_the_contract(tiny_models: Path) -> None:
    card = json.loads((tiny_models / "card.json").read_text())
    assert card["schema"] == 1 and card["input"] == {"shape": [1, 28, 28], "dtype": "uint8", "layout": "CHW"}
    for name, block in card["blocks"].items():
        data = (tiny_models / block["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == block["sha256"], name
        assert block["macs"] > 0 and block["params"] > 0 and block["bytes_moved"] > block["params"] * 4
    images = tiny_images(5)
    main = ort.InferenceSession(str(tiny_models / "main.onnx"), providers=["CPUExecutionProvider"])
    logits, features = main.run(["logits", "features"], {"image": images})
    assert logits.shape == (5, card["num_classes"]) and features.ndim == 4 and features.shape[0] == 5
    ext = ort.InferenceSession(str(tiny_models / "extension.onnx"), providers=["CPUExecutionProvider"])
    (hard,) = ext.run(["logits"], {"image": images[:2], "features": features[:2]})
    assert hard.shape == (2, len(card["hard_classes"]))
    cloud = ort.InferenceSession(str(tiny_models / "cloud.onnx"), providers=["CPUExecutionProvider"])
    (cloud_logits,) = cloud.run(["logits"], {"image": images})
    assert cloud_logits.shape == (5, card["num_classes"]) and cloud_logits.dtype == np.float32
    assert 0 < card["thresholds"]["entropy_tau"] < 1 and 0 < card["thresholds"]["hi_theta"] < 1


def test_tiny_models_are_deterministic(tmp_path: Path) -> None:
    a = write_tiny_model_dir(tmp_path / "a", seed=3, hard_classes=(1, 5))
    b = write_tiny_model_dir(tmp_path / "b", seed=3, hard_classes=(5, 1))
    card_a, card_b = (json.loads((d / "card.json").read_text()) for d in (a, b))
    assert card_a["blocks"] == card_b["blocks"] and card_a["hard_classes"] == [1, 5]
    c = write_tiny_model_dir(tmp_path / "c", seed=4)
    assert (
        json.loads((c / "card.json").read_text())["blocks"]["cloud"]["sha256"]
        != card_a["blocks"]["cloud"]["sha256"]
    )
