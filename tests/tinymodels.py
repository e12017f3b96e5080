"""Tiny but real ONNX models that follow the model-directory contract (`device_agent.card`), built with
`onnx.helper` only (no torch), so tests of the agent, the cloud worker and the metering can run the whole
cascade in milliseconds.

Every model is a fixed function of its input (weights drawn from `numpy.random.default_rng(seed)`), so a test
predicts the expected answer by running onnxruntime on the same file itself.

- main.onnx:      image uint8 [N,C,H,W] -> logits [N,num_classes], features [N,F,h,w]
                  (x/255 in the graph; a strided 3x3 conv + ReLU gives the features, a dense layer the logits)
- extension.onnx: image, features -> logits [N,len(hard_classes)]
- cloud.onnx:     image -> logits [N,num_classes] (a two-layer perceptron on the normalised pixels)

card.json carries the contract's keys: sha256 of every file, per-image macs/params/bytes_moved, and thresholds
calibrated on seeded random images so that about `target_offload_fraction` of them count as complex.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
FEATURE_CHANNELS = 4
CONV_STRIDE = 4
CLOUD_HIDDEN = 32
TARGET_OFFLOAD_FRACTION = 0.25


def tiny_images(n: int, seed: int = 0, shape: Sequence[int] = (1, 28, 28)) -> np.ndarray:
    """`n` deterministic uint8 images [n,C,H,W] (uniform noise) to feed the tiny models."""
    rng = np.random.default_rng(10_000 + seed)
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def _normalise_nodes(prefix: str) -> list:
    """uint8 image -> float32 x / 255 (the normalisation lives inside the graph, as the contract says)."""
    return [
        helper.make_node("Cast", ["image"], [f"{prefix}_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{prefix}_f", "inv255"], [f"{prefix}_x"]),
    ]


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgecascade-tests"
    )
    model.ir_version = 8  # readable by every onnxruntime >= 1.14 (Jetson wheels lag behind)
    onnx.checker.check_model(model, full_check=True)
    return model


def _feature_hw(h: int, w: int) -> Tuple[int, int]:
    # 3x3 conv, padding 1, stride CONV_STRIDE
    return (h + 2 - 3) // CONV_STRIDE + 1, (w + 2 - 3) // CONV_STRIDE + 1


def build_tiny_models(
    num_classes: int = 10,
    hard_classes: Sequence[int] = (0, 2, 4, 6),
    seed: int = 0,
    input_shape: Sequence[int] = (1, 28, 28),
) -> Dict[str, Any]:
    """The three models and per-image cost figures: {"main"|"extension"|"cloud": (ModelProto, costs)}."""
    c, h, w = (int(d) for d in input_shape)
    fh, fw = _feature_hw(h, w)
    f = FEATURE_CHANNELS
    n_feat = f * fh * fw
    n_pix = c * h * w
    n_hard = len(hard_classes)
    rng = np.random.default_rng(seed)
    inv255 = _init("inv255", np.array(1.0 / 255.0))
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", c, h, w])
    features = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", f, fh, fw])

    # Scales keep logits in a range where softmax is neither one-hot nor flat for noise images.
    conv_w = rng.normal(0, 1.0, size=(f, c, 3, 3))
    conv_b = rng.normal(0, 0.1, size=(f,))
    head_w = rng.normal(0, 3.0 / np.sqrt(n_feat), size=(n_feat, num_classes))
    head_b = rng.normal(0, 0.5, size=(num_classes,))
    main = helper.make_graph(
        [
            *_normalise_nodes("m"),
            helper.make_node(
                "Conv", ["m_x", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1], strides=[CONV_STRIDE] * 2
            ),
            helper.make_node("Relu", ["conv"], ["features"]),
            helper.make_node("Flatten", ["features"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logits"]),
        ],
        "tiny_main",
        [image],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes]), features],
        [
            inv255,
            _init("conv_w", conv_w),
            _init("conv_b", conv_b),
            _init("head_w", head_w),
            _init("head_b", head_b),
        ],
    )
    main_params = conv_w.size + conv_b.size + head_w.size + head_b.size
    main_macs = n_feat * c * 9 + n_feat * num_classes
    main_acts = n_pix + n_feat + num_classes

    ext_wf = rng.normal(0, 3.0 / np.sqrt(n_feat), size=(n_feat, n_hard))
    ext_wi = rng.normal(0, 3.0 / np.sqrt(n_pix), size=(n_pix, n_hard))
    ext_b = rng.normal(0, 0.5, size=(n_hard,))
    extension = helper.make_graph(
        [
            *_normalise_nodes("e"),
            helper.make_node("Flatten", ["e_x"], ["e_pix"], axis=1),
            helper.make_node("Flatten", ["features"], ["e_feat"], axis=1),
            helper.make_node("Gemm", ["e_feat", "ext_wf", "ext_b"], ["e_a"]),
            helper.make_node("MatMul", ["e_pix", "ext_wi"], ["e_b"]),
            helper.make_node("Add", ["e_a", "e_b"], ["logits"]),
        ],
        "tiny_extension",
        [image, features],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_hard])],
        [inv255, _init("ext_wf", ext_wf), _init("ext_wi", ext_wi), _init("ext_b", ext_b)],
    )
    ext_params = ext_wf.size + ext_wi.size + ext_b.size
    ext_macs = n_feat * n_hard + n_pix * n_hard
    ext_acts = n_pix + n_feat + n_hard

    cloud_w1 = rng.normal(0, 1.0 / np.sqrt(n_pix), size=(n_pix, CLOUD_HIDDEN)) * 4.0
    cloud_b1 = rng.normal(0, 0.1, size=(CLOUD_HIDDEN,))
    cloud_w2 = rng.normal(0, 3.0 / np.sqrt(CLOUD_HIDDEN), size=(CLOUD_HIDDEN, num_classes))
    cloud_b2 = rng.normal(0, 0.5, size=(num_classes,))
    cloud = helper.make_graph(
        [
            *_normalise_nodes("c"),
            helper.make_node("Flatten", ["c_x"], ["c_pix"], axis=1),
            helper.make_node("Gemm", ["c_pix", "cloud_w1", "cloud_b1"], ["c_h"]),
            helper.make_node("Relu", ["c_h"], ["c_r"]),
            helper.make_node("Gemm", ["c_r", "cloud_w2", "cloud_b2"], ["logits"]),
        ],
        "tiny_cloud",
        [image],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
        [inv255, _init("cloud_w1", cloud_w1), _init("cloud_b1", cloud_b1)]
        + [_init("cloud_w2", cloud_w2), _init("cloud_b2", cloud_b2)],
    )
    cloud_params = cloud_w1.size + cloud_b1.size + cloud_w2.size + cloud_b2.size
    cloud_macs = n_pix * CLOUD_HIDDEN + CLOUD_HIDDEN * num_classes
    cloud_acts = n_pix + CLOUD_HIDDEN + num_classes

    def costs(macs: int, params: int, acts: int) -> Dict[str, int]:
        return {"macs": int(macs), "params": int(params), "bytes_moved": int(params * 4 + acts * 4)}

    return {
        "main": (_model(main), costs(main_macs, main_params, main_acts)),
        "extension": (_model(extension), costs(ext_macs, ext_params, ext_acts)),
        "cloud": (_model(cloud), costs(cloud_macs, cloud_params, cloud_acts)),
    }


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _calibrate(main_path: Path, num_classes: int, seed: int, input_shape: Sequence[int]) -> Dict[str, float]:
    """Thresholds at which about TARGET_OFFLOAD_FRACTION of seeded noise images count as complex."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(main_path), providers=["CPUExecutionProvider"])
    probs = _softmax(session.run(["logits"], {"image": tiny_images(256, seed + 1, input_shape)})[0])
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1) / np.log(num_classes)
    tau = float(np.quantile(entropy, 1.0 - TARGET_OFFLOAD_FRACTION))
    theta = float(np.quantile(probs.max(axis=1), TARGET_OFFLOAD_FRACTION))
    return {"entropy_tau": round(tau, 6), "hi_theta": round(theta, 6)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_tiny_model_dir(
    path: Path,
    num_classes: int = 10,
    hard_classes: Sequence[int] = (0, 2, 4, 6),
    seed: int = 0,
    input_shape: Sequence[int] = (1, 28, 28),
    dataset: str = "tiny-noise",
    thresholds: Optional[Dict[str, float]] = None,
) -> Path:
    """Write main/extension/cloud.onnx, card.json and MODEL_CARD.md into `path` (created); returns `path`.

    `thresholds` overrides the calibrated entropy_tau / hi_theta (e.g. tau=0 to offload everything).
    """
    hard = sorted(int(k) for k in hard_classes)
    if len(set(hard)) != len(hard) or not all(0 <= k < num_classes for k in hard) or not hard:
        raise ValueError(f"hard_classes {hard_classes!r} must be distinct class ids below {num_classes}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    blocks: Dict[str, Dict[str, Any]] = {}
    for name, (model, costs) in build_tiny_models(num_classes, hard, seed, input_shape).items():
        file = path / f"{name}.onnx"
        onnx.save_model(model, str(file))
        blocks[name] = {"file": file.name, "sha256": _sha256(file), **costs}
    calibrated = _calibrate(path / "main.onnx", num_classes, seed, input_shape)
    calibrated.update(thresholds or {})
    card = {
        "schema": 1,
        "dataset": dataset,
        "backbone": "tiny",
        "num_classes": num_classes,
        "class_names": [f"class-{k}" for k in range(num_classes)],
        "input": {"shape": [int(d) for d in input_shape], "dtype": "uint8", "layout": "CHW"},
        "hard_classes": hard,
        "thresholds": {
            **calibrated,
            "calibrated_on": f"256 seeded uniform-noise images (seed {seed + 1})",
            "target_offload_fraction": TARGET_OFFLOAD_FRACTION,
        },
        "blocks": blocks,
        # Random weights: accuracy means nothing here, so it is stated as unknown rather than invented.
        "accuracy": {
            split: dict.fromkeys(
                ["main", "extension_on_hard", "edge_cascade", "cloud", "cascade", "offload_fraction"]
            )
            for split in ("validation", "test")
        },
        "training": {
            "command": f"tests.tinymodels.write_tiny_model_dir(seed={seed})",
            "seed": seed,
            "device": "cpu",
            "torch": None,
            "epochs": {},
            "seconds": 0.0,
        },
    }
    (path / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (path / "MODEL_CARD.md").write_text(
        f"# Tiny test models\n\nRandom fixed weights (seed {seed}), built by tests/tinymodels.py for tests "
        "only; their answers are meaningless but deterministic.\n"
    )
    return path
