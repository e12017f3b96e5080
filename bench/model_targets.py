"""Print issue 3's model targets, measured on the Fashion-MNIST test set with onnxruntime, PASS/FAIL each.

    .venv/bin/python bench/model_targets.py [--model-dir models/fashion-mnist] [--data-dir DIR]
        [--estimate-train-time]   # also time training steps here and extrapolate `make train` (needs torch)

Exit status 1 when a target fails. Uses the torch-free runner (device_agent.cascade) as a device would.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cloud_worker.model import CloudSession  # noqa: E402
from device_agent.cascade import EdgeCascade  # noqa: E402

TRAIN_BUDGET_S = 90 * 60


def read_idx_gz(path: Path) -> np.ndarray:
    """An idx(.gz) file as a numpy array (numpy only, so this script needs no torch)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        data = fh.read()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_test(data_dir: Path) -> Tuple[np.ndarray, np.ndarray]:
    def find(stem: str) -> Path:
        for p in (data_dir / f"{stem}.gz", data_dir / stem):
            if p.exists():
                return p
        raise SystemExit(f"{stem}(.gz) not found in {data_dir}; pass --data-dir")

    images = read_idx_gz(find("t10k-images-idx3-ubyte"))[:, None, :, :]
    labels = read_idx_gz(find("t10k-labels-idx1-ubyte")).astype(np.int64)
    return np.ascontiguousarray(images), labels


def evaluate(model_dir: Path, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> dict:
    """Test-set figures from the ONNX blocks with the device's rule."""
    cascade = EdgeCascade(model_dir)
    cloud = CloudSession(cascade.card.block_path("cloud"))
    main_pred: List[np.ndarray] = []
    edge_pred, gated_pred, complex_, cloud_pred = [], [], [], []
    t0 = time.perf_counter()
    for start in range(0, len(labels), batch):
        x = images[start : start + batch]
        main_pred.append(cascade.run_main(x).probs.argmax(1))
        # The edge's figures ungated (what edge-only answers); the cascade's with the card's gate (meanet).
        edge_pred.append(np.array([d.prediction for d in cascade.decide(x, gated=False)]))
        decisions = cascade.decide(x)
        gated_pred.append(np.array([d.prediction for d in decisions]))
        complex_.append(np.array([d.complex for d in decisions]))
        cloud_pred.append(cloud.logits(x).argmax(1))
    seconds = time.perf_counter() - t0
    mp, ep, gp, cx, cp = (np.concatenate(a) for a in (main_pred, edge_pred, gated_pred, complex_, cloud_pred))
    hard = np.isin(labels, cascade.card.hard_classes)
    final = np.where(cx, cp, gp)
    blocks = cascade.card.blocks
    return {
        "main": float((mp == labels).mean()),
        "cloud": float((cp == labels).mean()),
        "main_on_hard": float((mp == labels)[hard].mean()),
        "edge_on_hard": float((ep == labels)[hard].mean()),
        "edge_cascade": float((ep == labels).mean()),
        "cascade": float((final == labels).mean()),
        "offload_fraction": float(cx.mean()),
        "macs_ratio": blocks["main"].macs / blocks["cloud"].macs,
        "samples": int(len(labels)),
        "seconds": seconds,
        "card": cascade.card,
    }


def targets(r: dict) -> List[Tuple[str, str, bool]]:
    pp = 100.0
    return [
        ("main block alone >= 90.0 %", f"{pp * r['main']:.2f} %", r["main"] >= 0.900),
        ("cloud model >= 94.0 %", f"{pp * r['cloud']:.2f} %", r["cloud"] >= 0.940),
        (
            "cloud - main >= 2.0 pp",
            f"{pp * (r['cloud'] - r['main']):+.2f} pp",
            r["cloud"] - r["main"] >= 0.020,
        ),
        ("main MACs <= 10 % of cloud's", f"{pp * r['macs_ratio']:.2f} %", r["macs_ratio"] <= 0.10),
        (
            "hard-class samples: main+ext >= main + 1.5 pp",
            f"{pp * r['edge_on_hard']:.2f} % vs {pp * r['main_on_hard']:.2f} % "
            f"({pp * (r['edge_on_hard'] - r['main_on_hard']):+.2f} pp)",
            r["edge_on_hard"] - r["main_on_hard"] >= 0.015,
        ),
        (
            "edge cascade >= main + 0.7 pp",
            f"{pp * r['edge_cascade']:.2f} % ({pp * (r['edge_cascade'] - r['main']):+.2f} pp)",
            r["edge_cascade"] - r["main"] >= 0.007,
        ),
        (
            "full cascade >= cloud - 0.3 pp",
            f"{pp * r['cascade']:.2f} % ({pp * (r['cascade'] - r['cloud']):+.2f} pp)",
            r["cascade"] - r["cloud"] >= -0.003,
        ),
        (
            "... with <= 25 % to the cloud",
            f"{pp * r['offload_fraction']:.2f} %",
            r["offload_fraction"] <= 0.25,
        ),
    ]


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "fashion-mnist")
    parser.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument(
        "--estimate-train-time",
        action="store_true",
        help="time training steps of the default recipe here and extrapolate `make train` on this CPU",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for --estimate-train-time")
    args = parser.parse_args(argv)
    images, labels = load_test(args.data_dir)
    r = evaluate(args.model_dir, images, labels)
    rows = targets(r)
    card = r["card"]
    tr = card.training
    print(f"model dir {args.model_dir} ({card.dataset}, {card.backbone}); test set {r['samples']} images; ")
    print(
        f"hard classes {card.hard_classes}; tau {card.entropy_tau}; onnxruntime pass {r['seconds']:.1f} s\n"
    )
    width = max(len(t[0]) for t in rows) + 2
    print(f"{'target':<{width}}{'measured':<40}result")
    for name, value, ok in rows:
        print(f"{name:<{width}}{value:<40}{'PASS' if ok else 'FAIL'}")
    print(
        f"\ntraining as recorded in the card: {tr.get('seconds')} s on {tr.get('device')} "
        f"({json.dumps(tr.get('stage_seconds'))})"
    )
    ok_all = all(ok for _, _, ok in rows)
    if args.estimate_train_time:
        from training.estimate import cpu_description, estimate_recipe_seconds

        est = estimate_recipe_seconds(threads=args.threads)
        ok = est["total_s"] <= TRAIN_BUDGET_S
        ok_all = ok_all and ok
        print(
            f"`make train` on this CPU ({cpu_description()}; {args.threads} threads), "
            "extrapolated from timed steps:"
        )
        for stage, sec in est["stages_s"].items():
            print(f"  {stage:<10} {sec / 60:6.1f} min  ({est['step_s'][stage] * 1000:.0f} ms/step)")
        print(
            f"{'make train <= 90 min on 2 CPU cores':<{width}}{est['total_s'] / 60:.1f} min{'':<30}"
            f"{'PASS' if ok else 'FAIL'}"
        )
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
