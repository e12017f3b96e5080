"""`python -m bench.extension_front`: does the extension block earn its place? The accuracy-offload-energy
front of hi-threshold (main block alone) against meanet with and without the card's extension gate.

Offline, on the 10,000 Fashion-MNIST test images: each block's logits once from onnxruntime (cached in
build/), then the device's rule (`training.reference.edge_rule`, tested to decide as `EdgeCascade`) for every
threshold of a sweep: hi-threshold offloads where the main max-softmax < θ, meanet where the edge answer's
entropy > τ. At each offload share the table gives accuracy and the device's analytic joules per image
(main block, plus the extension where it ran; `metering.analytic`, the card's MACs and bytes): at equal
offload the radio's joules are the same for every policy, so compute is what differs. The plot has the
front of each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnxruntime as ort
import torch

from device_agent.card import NO_GATE, load_card, sha256_file
from device_agent.sources import load_idx_dataset
from metering.analytic import AnalyticModel
from training.reference import edge_rule

SHARES = (0.10, 0.15, 0.20, 0.25, 0.30)


def block_outputs(model_dir: Path, cache: Path) -> Dict[str, np.ndarray]:
    key = sha256_file(model_dir / "card.json")[:12]
    path = cache / f"front-{key}.npz"
    if path.exists():
        return dict(np.load(path))
    images, labels = load_idx_dataset("fashion-mnist", "test")
    opts = ort.SessionOptions()
    sessions = {
        n: ort.InferenceSession(str(model_dir / f"{n}.onnx"), opts) for n in ("main", "extension", "cloud")
    }
    parts: Dict[str, List[np.ndarray]] = {"main": [], "extension": [], "cloud": []}
    for start in range(0, len(images), 500):
        x = np.ascontiguousarray(images[start : start + 500])
        logits, features = sessions["main"].run(["logits", "features"], {"image": x})
        parts["main"].append(logits)
        parts["extension"].append(
            sessions["extension"].run(["logits"], {"image": x, "features": features})[0]
        )
        cloud = sessions["cloud"]
        parts["cloud"].append(cloud.run(None, {cloud.get_inputs()[0].name: x})[0])
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["labels"] = np.asarray(labels)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)  # type: ignore[arg-type]  # numpy stubs take the first keyword for allow_pickle
    return out


def front(
    o: Dict[str, np.ndarray], hard: List[int], gate: Tuple[float, float], j: Dict[str, float]
) -> Dict[str, Any]:
    """Each policy at each offload share: accuracy, offloaded, device joules per image."""
    main, ext, cloud = (torch.from_numpy(o[k]) for k in ("main", "extension", "cloud"))
    labels = torch.from_numpy(o["labels"])
    cloud_ok = cloud.argmax(1) == labels
    p_main, main_pred = torch.softmax(main.float(), 1).max(1)
    rows: Dict[str, Any] = {}
    for name, g in (("meanet (gated)", gate), ("meanet (ungated)", (0.0, NO_GATE))):
        edge = edge_rule(main, ext, hard, g)
        ran = float(edge.ran_extension.double().mean())
        rows[name] = [
            _point(edge.entropy, edge.prediction == labels, cloud_ok, s, j["main"] + ran * j["extension"])
            for s in SHARES
        ]
        for point in rows[name]:
            point["extension_ran"] = ran
    rows["hi-threshold"] = [
        _point(-p_main.double(), main_pred == labels, cloud_ok, s, j["main"]) for s in SHARES
    ]
    return rows


def _point(
    score: torch.Tensor, edge_ok: torch.Tensor, cloud_ok: torch.Tensor, share: float, joules: float
) -> Dict[str, Any]:
    off = score >= torch.quantile(score.double(), 1.0 - share)
    correct = torch.where(off, cloud_ok, edge_ok)
    return {
        "share": share,
        "offloaded": float(off.double().mean()),
        "accuracy": float(correct.double().mean()),
        "device_mj": 1e3 * joules,
    }


def plot(rows: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in rows.items():
        axes[0].plot(
            [100 * p["offloaded"] for p in points], [100 * p["accuracy"] for p in points], "o-", label=name
        )
        axes[1].plot([p["device_mj"] for p in points], [100 * p["accuracy"] for p in points], "o", label=name)
    axes[0].set(xlabel="offloaded (%)", ylabel="accuracy (%)", title="accuracy against offload")
    axes[1].set(
        xlabel="device analytic energy per image (mJ)", ylabel="accuracy (%)", title="accuracy against energy"
    )
    axes[0].legend(fontsize=8)
    figure.suptitle("Fashion-MNIST test (10,000), offline from onnxruntime outputs")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.extension_front", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument("--cache", type=Path, default=Path("build"))
    parser.add_argument("--plot", type=Path, help="write the front as a PNG here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    card = load_card(args.models)
    analytic = AnalyticModel.for_card(card.raw)
    joules = {n: analytic.block_j(n) for n in ("main", "extension")}
    rows = front(block_outputs(args.models, args.cache), card.hard_classes, card.extension_gate, joules)
    print(
        f"{args.models}: extension gate {card.extension_gate}; main {1e3 * joules['main']:.3f} mJ, "
        f"extension {1e3 * joules['extension']:.3f} mJ per image (analytic)"
    )
    print(f"{'offload':>8} " + " ".join(f"{name:>28}" for name in rows))
    for i, share in enumerate(SHARES):
        cells = [f"{100 * rows[n][i]['accuracy']:6.2f} % {rows[n][i]['device_mj']:.3f} mJ" for n in rows]
        print(f"{100 * share:>7.0f}% " + " ".join(f"{c:>28}" for c in cells))
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
