"""CLI for `edgecascade video`: generate the synthetic video benchmark (`video make`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

EPILOG = """examples:
  # the sets the committed detectors were trained and evaluated on
  edgecascade video make --split train --sequences 800 --frames 24 --out build/video/train
  edgecascade video make --split test --sequences 20 --frames 150 --out build/video/test

  # a tiny set for a smoke test, 160x160 frames
  edgecascade video make --split test --sequences 2 --frames 30 --size 160 --out /tmp/tiny

Train sequences take sprites only from the Fashion-MNIST train split, test sequences only from the test split;
the same --seed gives the same bytes. Layout: see video/dataset.py (one npz per sequence, COCO
annotations.json).
"""


HELP = "Synthetic video benchmark (REACT detection)"
DESCRIPTION = (
    "The REACT video detection task: `edgecascade video make --help`, `edgecascade video run --help`."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options; `edgecascade.cli` makes the parser (help, description, EPILOG, run)."""
    sub = parser.add_subparsers(dest="video_command", metavar="VIDEO_COMMAND", required=True)
    make = sub.add_parser(
        "make",
        help="generate sequences of Fashion-MNIST items with COCO ground truth",
        description="Generate deterministic synthetic video sequences (uint8 grey frames, nominal fps) of "
        "moving, occluding Fashion-MNIST items over textured noisy backgrounds, with COCO ground truth.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    make.add_argument(
        "--split", choices=["train", "test"], required=True, help="Fashion-MNIST split to draw from"
    )
    make.add_argument("--sequences", type=int, default=20, help="number of sequences")
    make.add_argument("--frames", type=int, default=150, help="frames per sequence")
    make.add_argument("--size", type=int, default=128, help="frame width and height in pixels")
    make.add_argument("--fps", type=float, default=30.0, help="nominal frame rate")
    make.add_argument("--seed", type=int, default=0, help="seed: decides everything")
    make.add_argument("--data-dir", help="directory of the Fashion-MNIST IDX files (default: searched)")
    make.add_argument("--out", type=Path, required=True, help="output directory")
    make.set_defaults(func=run_make)


def run(args: argparse.Namespace) -> int:
    return int(args.func(args))  # pragma: no cover - argparse requires a VIDEO_COMMAND, whose func wins


def run_make(args: argparse.Namespace) -> int:
    from device_agent.sources import FASHION_MNIST_CLASSES, load_idx_dataset
    from video.dataset import write_split
    from video.synth import SynthConfig

    try:
        config = SynthConfig(width=args.size, height=args.size, frames=args.frames, fps=args.fps)
        search = [args.data_dir] if args.data_dir else None
        images, labels = load_idx_dataset("fashion-mnist", args.split, search=search)
    except (ValueError, FileNotFoundError) as exc:
        print(f"edgecascade video make: {exc}", file=sys.stderr)
        return 2
    progress = None
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=args.sequences, desc=f"video {args.split}", unit="seq")
        progress = bar.update
    try:
        manifest = write_split(
            args.out,
            args.split,
            args.sequences,
            config,
            args.seed,
            images,
            labels,
            progress,
            class_names=FASHION_MNIST_CLASSES,
        )
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps({k: manifest[k] for k in ("split", "seed", "sequences", "frames_per_sequence")}))
    return 0
