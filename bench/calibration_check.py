"""How often does a calibrated τ keep its promise on unseen data? Resampling check of the calibration rule.

The committed blocks are run once (onnxruntime) over the 15,000 Fashion-MNIST images no block trained on:
the 5,000-image validation split and the 10,000-image test set. Then, many times over, 5,000 of them are
drawn to calibrate τ and the other 10,000 judge it against the issue's target (cascade ≥ cloud − 0.3 pp with
≤ 25 % offloaded). Each rule's miss rate says how often `make train` would publish a τ that fails on test.

    python -m bench.calibration_check [--models models/fashion-mnist] [--repeats 500]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from results_db.stats import nearest_rank
from training.reference import calibrate_offload

TARGET_DEFICIT = 0.003  # the issue: cascade ≥ cloud-only − 0.3 pp ...
TARGET_OFFLOAD = 0.25  # ... with ≤ 25 % of samples offloaded
# (label, tolerance, confidence): the rule before this check, the plain rule at the target, the margin rule
RULES: List[Tuple[str, float, float]] = [
    ("first crossing, tolerance 0.2 pp (old)", 0.002, 0.5),
    ("first crossing, tolerance 0", 0.0, 0.5),
    ("bound at 90 %, tolerance 0.3 pp", 0.003, 0.90),
    ("bound at 95 %, tolerance 0.3 pp (default)", 0.003, 0.95),
]


def held_out_outcomes(models: Path, data_dir: str | None) -> Dict[str, torch.Tensor]:
    """The device's rule and the cloud on validation + test (the pool no block trained on): per sample the
    edge answer's entropy (the offload score), whether the edge answer and whether the cloud's is right."""
    from cloud_worker.model import CloudSession
    from device_agent.cascade import EdgeCascade
    from training.datasets import load_dataset

    cascade = EdgeCascade(models)
    cloud = CloudSession(cascade.card.block_path("cloud"))
    seed = int(cascade.card.training["seed"])
    bundle = load_dataset("fashion-mnist", data_dir, val_size=5000, seed=seed)
    score, edge_ok, cloud_ok = [], [], []
    for split in (bundle.val, bundle.test):
        for images, labels in split.batches(1000):
            x, y = images.numpy(), labels.numpy()
            decisions = cascade.decide(x)
            score.append(np.array([d.entropy for d in decisions]))
            edge_ok.append(np.array([d.prediction for d in decisions]) == y)
            cloud_ok.append(cloud.logits(x).argmax(1) == y)
    return {
        "score": torch.from_numpy(np.concatenate(score)),
        "edge_ok": torch.from_numpy(np.concatenate(edge_ok)),
        "cloud_ok": torch.from_numpy(np.concatenate(cloud_ok)),
    }


def check(pool: Dict[str, torch.Tensor], repeats: int, calib_size: int, seed: int) -> List[Dict[str, float]]:
    score, edge_ok, cloud_ok = pool["score"], pool["edge_ok"], pool["cloud_ok"]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for label, tolerance, confidence in RULES:
        deficits, fractions = [], []
        for _ in range(repeats):
            perm = torch.randperm(score.shape[0], generator=gen)
            cal, ev = perm[:calib_size], perm[calib_size:]
            tau = calibrate_offload(
                score[cal], edge_ok[cal], cloud_ok[cal], TARGET_OFFLOAD, tolerance, confidence
            ).threshold
            off = score[ev] > tau
            final_ok = torch.where(off, cloud_ok[ev], edge_ok[ev])
            deficits.append(float(final_ok.double().mean() - cloud_ok[ev].double().mean()))
            fractions.append(float(off.double().mean()))
        d, f = np.asarray(deficits), np.asarray(fractions)
        miss_acc, miss_off = d < -TARGET_DEFICIT - 1e-12, f > TARGET_OFFLOAD
        miss = miss_acc | miss_off
        rows.append(
            {
                "rule": label,
                "offload_mean": f.mean(),
                "offload_p95": nearest_rank(f.tolist(), 95),
                "deficit_mean": d.mean(),
                "deficit_p05": nearest_rank(d.tolist(), 5),
                "miss_rate": miss.mean(),
                "miss_accuracy": miss_acc.mean(),
                "miss_offload": miss_off.mean(),
            }
        )
    return rows


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument(
        "--data-dir", help="Fashion-MNIST idx files (default: Debian's dataset-fashion-mnist)"
    )
    parser.add_argument("--repeats", type=int, default=500, help="random calibration/evaluation splits")
    parser.add_argument("--calib-size", type=int, default=5000, help="calibration images per split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pool = held_out_outcomes(args.models, args.data_dir)
    n = int(pool["score"].shape[0])
    print(
        f"{args.models}: {n} held-out images; {args.repeats} splits into {args.calib_size} to calibrate, "
        f"{n - args.calib_size} to evaluate; target: cascade ≥ cloud − {100 * TARGET_DEFICIT:.1f} pp, "
        f"≤ {TARGET_OFFLOAD:.0%} offloaded"
    )
    print(
        f"{'rule':44} {'offload':>8} {'p95':>7} {'Δ cloud':>8} {'p05 Δ':>8} {'miss':>6} "
        f"{'(Δ':>6} {'offload)':>8}"
    )
    for r in check(pool, args.repeats, args.calib_size, args.seed):
        print(
            f"{r['rule']:44} {100 * r['offload_mean']:7.1f}% {100 * r['offload_p95']:6.1f}% "
            f"{100 * r['deficit_mean']:+7.2f}pp {100 * r['deficit_p05']:+7.2f}pp "
            f"{100 * r['miss_rate']:5.1f}% {100 * r['miss_accuracy']:5.1f}% {100 * r['miss_offload']:7.1f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
