"""CLI of the video detectors: `python -m training.detection {train,publish}`."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

EPILOG = """examples:
  # the committed detectors (data from `edgecascade video make`, see models/video-fmnist/MODEL_CARD.md)
  python -m training.detection train --kind edge --steps 3000 --threads 1 --ckpt build/video/ckpt/edge.pt
  python -m training.detection train --kind cloud --steps 3000 --threads 1 --ckpt build/video/ckpt/cloud.pt
  python -m training.detection publish --edge build/video/ckpt/edge.pt --cloud build/video/ckpt/cloud.pt \\
      --test build/video/test --out models/video-fmnist

  # smoke run (seconds): a few steps of each on a tiny set, published to a temporary directory
  python -m training.detection train --kind both --quick --train /tmp/tiny --ckpt-dir /tmp/ckpt
  python -m training.detection train --kind edge --device cuda --steps 20000 --batch 128 ...
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.detection",
        description="Train the REACT edge and cloud detectors, export ONNX, write the model card.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    register_commands(parser)
    return parser


def register_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="detection_command", metavar="COMMAND", required=True)
    tr = sub.add_parser("train", help="train one detector (or both, one after the other)")
    tr.add_argument("--kind", choices=["edge", "cloud", "both"], required=True)
    tr.add_argument("--train", type=Path, default=Path("build/video/train"), help="generated train split")
    tr.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    tr.add_argument("--batch", type=int, default=32)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    tr.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    tr.add_argument("--ckpt", type=Path, help="checkpoint file (one kind)")
    tr.add_argument("--ckpt-dir", type=Path, default=Path("build/video/ckpt"), help="for --kind both")
    tr.add_argument("--quick", action="store_true", help="smoke mode: 8 steps, batch 4, 2 sequences")
    tr.set_defaults(func=_run_train)
    pub = sub.add_parser("publish", help="export ONNX, evaluate on the test split, write card.json")
    pub.add_argument("--edge", type=Path, required=True, help="edge checkpoint")
    pub.add_argument("--cloud", type=Path, required=True, help="cloud checkpoint")
    pub.add_argument("--test", type=Path, default=Path("build/video/test"), help="generated test split")
    pub.add_argument("--out", type=Path, default=Path("models/video-fmnist"))
    pub.add_argument("--command", dest="train_command", default="", help="training command for the card")
    pub.add_argument("--limit-sequences", type=int, help="evaluate on the first N test sequences only")
    pub.set_defaults(func=_run_publish)


def run(args: argparse.Namespace) -> int:
    return int(args.func(args) or 0)


def _run_train(args: argparse.Namespace) -> int:
    import torch

    from training.detection import FrameBank, TrainConfig, train

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        logger.warning("CUDA asked for but not available: training on the CPU")
        device = "cpu"
    kinds = ["edge", "cloud"] if args.kind == "both" else [args.kind]
    steps, batch = (8, 4) if args.quick else (args.steps, args.batch)
    bank = FrameBank(args.train, limit_sequences=2 if args.quick else None)
    start = time.monotonic()
    for kind in kinds:
        ckpt = args.ckpt if (args.ckpt and len(kinds) == 1) else args.ckpt_dir / f"{kind}.pt"
        cfg = TrainConfig(
            kind=kind,
            steps=steps,
            batch=batch,
            lr=args.lr,
            seed=args.seed,
            device=device,
            threads=args.threads,
            warmup_steps=min(200, max(steps // 10, 1)),
        )
        train(cfg, bank, ckpt, log_every=1 if args.quick else 50)
    logger.info("all training: %.0f s", time.monotonic() - start)
    return 0


def _run_publish(args: argparse.Namespace) -> int:
    from training.detection_publish import publish

    card = publish(args.edge, args.cloud, args.test, args.out, args.train_command, args.limit_sequences)
    for kind in ("edge", "cloud"):
        m = card["models"][kind]
        print(f"{kind}: {m['macs']:,} MACs, mAP@0.5 {m['map50']:.3f}, mAP {m['map']:.3f}")
    return 0
