"""CLI for `edgecascade train`: MEANet training, calibration, ONNX export and model card."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

EPILOG = """examples:
  edgecascade train --out models/fashion-mnist          # the committed models (what `make train` runs)
  edgecascade train --quick                             # smoke run on a subset, < 1 min on 2 cores
  edgecascade train --backbone mobilenetv2 --dataset cifar100 --data-dir ~/data/cifar100 --out models/c100
  edgecascade train --device cuda --checkpoint-dir ckpt --no-export   # train only (e.g. on a GPU box) ...
  edgecascade train --checkpoint-dir ckpt --out models/fashion-mnist  # ... then calibrate + export elsewhere
  edgecascade train --reuse-cloud models/fashion-mnist --out models/fmnist-edge2   # new edge, same cloud
  edgecascade train --init-from models/fashion-mnist --corruption-p 0.5 --lr 0.02 --out build/robust
                                                        # fine-tune for robustness to corruptions
  edgecascade train --init-from models/fashion-mnist --distill-from models/fashion-mnist \
      --corruption-p 0.5 --lr 0.01 --out build/robust   # ... learning the clean cloud's answers as well
"""


HELP = "Train the MEANet cascade and export ONNX + model card"
DESCRIPTION = (
    "Train main block, extension block (hard classes) and cloud model; calibrate the exit "
    "thresholds on a validation split carved from train; export ONNX (uint8 input) and write card.json."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options; `edgecascade.cli` makes the parser (help, description, EPILOG, run)."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=["fashion-mnist", "cifar100", "imagenet"], default="fashion-mnist")
    data.add_argument(
        "--data-dir",
        help="dataset directory (fashion-mnist: the four idx(.gz) files, "
        "default /usr/share/datasets/fashion-mnist; "
        "cifar100: holds cifar-100-python/; imagenet: holds train/ and val/ class folders)",
    )
    data.add_argument("--val-size", type=int, default=5000, help="validation images carved from train")
    data.add_argument("--image-size", type=int, default=64, help="resize for ImageFolder datasets")
    data.add_argument("--workers", type=int, default=2, help="decoding workers for ImageFolder datasets")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=["resnet", "mobilenetv2"], default="resnet")
    model.add_argument("--hard-count", type=int, help="number of hard classes (default: half of the classes)")
    model.add_argument(
        "--hard-mode", choices=["lowest-accuracy", "confusion-pairs"], default="lowest-accuracy"
    )
    model.add_argument("--main-widths", type=_ints, help="ResNet main block stage widths, e.g. 12,24,48")
    model.add_argument("--main-blocks", type=int, help="ResNet main block BasicBlocks per stage (default 1)")
    model.add_argument(
        "--cloud-widths", type=_ints, help="ResNet cloud model stage widths (default 32,64,128)"
    )
    model.add_argument(
        "--cloud-blocks", type=int, help="ResNet cloud model BasicBlocks per stage (default 3)"
    )
    model.add_argument(
        "--adaptive-channels", type=_ints, help="adaptive block channels c0,c1 (default 32,64)"
    )
    model.add_argument(
        "--adaptive-blocks", type=int, help="BasicBlocks after each adaptive downsampling (default 1)"
    )
    model.add_argument("--ext-width", type=int, help="extension block width (default 96)")
    model.add_argument("--ext-blocks", type=int, help="extension block residual blocks (default 2)")
    run_g = parser.add_argument_group("run")
    run_g.add_argument(
        "--quick", action="store_true", help="subset, tiny nets, one epoch each (tests use it)"
    )
    run_g.add_argument("--out", help="output directory (default models/<dataset>, or build/quick/<dataset>)")
    run_g.add_argument("--epochs-main", type=int, help="stage 1 epochs (default 15; quick 1)")
    run_g.add_argument("--epochs-ext", type=int, help="stage 2 epochs (default 20; quick 1)")
    run_g.add_argument("--epochs-cloud", type=int, help="cloud model epochs (default 15; quick 1)")
    run_g.add_argument("--batch-size", type=int, help="default 128")
    run_g.add_argument("--lr", type=float, dest="max_lr", help="one-cycle peak learning rate (default 0.1)")
    run_g.add_argument("--train-limit", type=int, help="use at most this many training images")
    run_g.add_argument("--test-limit", type=int, help="evaluate at most this many test images")
    robust = parser.add_argument_group("robust training (issue 16)")
    robust.add_argument(
        "--corruption-p",
        type=float,
        help="corrupt this share of training images, each by one of --corruption-kinds (default 0)",
    )
    robust.add_argument(
        "--corruption-kinds",
        type=_corruption_kinds,
        help="comma-separated, of gaussian-noise,blur,contrast,brightness,rotation,jpeg "
        "(default: all but jpeg)",
    )
    robust.add_argument(
        "--crop-padding", type=int, help="random shifts of up to this many px (default H // 8)"
    )
    robust.add_argument(
        "--distill-from",
        metavar="MODEL_DIR",
        help="also learn this directory's cloud model's answers on each clean training image (distillation)",
    )
    robust.add_argument(
        "--distill-weight", type=float, help="share of the loss that is distillation (default 0.5)"
    )
    robust.add_argument(
        "--init-from",
        metavar="MODEL_DIR",
        help="fine-tune the published models of this directory (keeps its architecture and hard classes)",
    )
    run_g.add_argument(
        "--max-offload", type=float, help="cap on the calibrated offload fraction (default 0.25)"
    )
    run_g.add_argument(
        "--tolerance",
        type=float,
        help="accuracy the cascade may trail the cloud by, as a fraction (default 0.003 = 0.3 pp)",
    )
    run_g.add_argument(
        "--confidence",
        type=float,
        help="probability that τ keeps that tolerance on unseen data (default 0.95; 0.5: no margin)",
    )
    run_g.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present"
    )
    run_g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    run_g.add_argument("--seed", type=int, default=0)
    run_g.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="save each stage's state dict here; stages already saved there are loaded, not retrained",
    )
    run_g.add_argument("--no-export", action="store_true", help="train (and checkpoint) only")
    run_g.add_argument(
        "--reuse-cloud",
        type=Path,
        metavar="MODEL_DIR",
        help="publish the cloud block of this model directory unchanged instead of training one "
        "(a new edge pair for a cloud model already deployed)",
    )
    run_g.add_argument(
        "--stages",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=["main", "extension", "cloud"],
        help="train only these of main,extension,cloud (with --checkpoint-dir and --no-export)",
    )
    run_g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _corruption_kinds(text: str) -> tuple:
    from training.augment import check_kinds

    kinds = tuple(x.strip() for x in text.split(",") if x.strip())
    try:
        check_kinds(kinds)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return kinds


def _ints(text: str) -> tuple:
    return tuple(int(x) for x in text.split(",") if x.strip())


def recipe_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from training.pipeline import Recipe

    main_o = {"widths": args.main_widths, "blocks_per_stage": args.main_blocks}
    cloud_o = {"widths": args.cloud_widths, "blocks_per_stage": args.cloud_blocks}
    if args.backbone != "resnet" and any(v is not None for v in (*main_o.values(), *cloud_o.values())):
        raise SystemExit("--main-*/--cloud-* widths and blocks apply to --backbone resnet only")
    kw = {
        "dataset": args.dataset,
        "backbone": args.backbone,
        "seed": args.seed,
        "epochs_main": args.epochs_main,
        "epochs_ext": args.epochs_ext,
        "epochs_cloud": args.epochs_cloud,
        "batch_size": args.batch_size,
        "max_lr": args.max_lr,
        "hard_count": args.hard_count,
        "hard_mode": args.hard_mode,
        "val_size": args.val_size,
        "image_size": args.image_size,
        "max_offload": args.max_offload,
        "tolerance": args.tolerance,
        "confidence": args.confidence,
        "train_limit": args.train_limit,
        "test_limit": args.test_limit,
        "extension_width": args.ext_width,
        "adaptive_channels": args.adaptive_channels,
        "adaptive_blocks": args.adaptive_blocks,
        "extension_blocks": args.ext_blocks,
        "main_overrides": {k: v for k, v in main_o.items() if v is not None} or None,
        "cloud_overrides": {k: v for k, v in cloud_o.items() if v is not None} or None,
        "corruption_p": args.corruption_p,
        "corruption_kinds": args.corruption_kinds,
        "crop_padding": args.crop_padding,
        "init_from": args.init_from,
        "distill_from": args.distill_from,
        "distill_weight": args.distill_weight,
    }
    if args.quick:
        return Recipe.quick_recipe(**kw)
    return Recipe(**{k: v for k, v in kw.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    import torch

    from training.datasets import DatasetError
    from training.engine import resolve_device
    from training.pipeline import load_bundle, train_models
    from training.publish import ReusedCloud, main_command, publish

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = recipe_from_args(args)
    out = Path(args.out) if args.out else Path("build/quick" if args.quick else "models") / args.dataset
    command = main_command()
    t0 = time.perf_counter()
    try:
        bundle = load_bundle(recipe, args.data_dir, workers=args.workers)
        device = resolve_device(args.device)
    except (DatasetError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{bundle.name}: train {len(bundle.train)}, validation {len(bundle.val)}, test {len(bundle.test)}; "
        f"device {device}; backbone {recipe.backbone}",
        file=sys.stderr,
    )
    reused = None
    if args.reuse_cloud:
        try:
            reused = ReusedCloud.open(args.reuse_cloud, bundle)
        except ValueError as exc:
            print(f"error: --reuse-cloud: {exc}", file=sys.stderr)
            return 2
        args.stages = [s for s in args.stages if s != "cloud"]
    bad = set(args.stages) - {"main", "extension", "cloud"}
    if bad or (
        set(args.stages) | ({"cloud"} if reused else set()) != {"main", "extension", "cloud"}
        and not (args.no_export and args.checkpoint_dir)
    ):
        print(
            "error: --stages takes main,extension,cloud; a subset needs --checkpoint-dir and --no-export",
            file=sys.stderr,
        )
        return 2
    trained = train_models(
        recipe, bundle, args.device, args.checkpoint_dir, not args.no_progress, command, stages=args.stages
    )
    train_s = time.perf_counter() - t0
    if args.no_export:
        print(f"trained in {train_s:.0f} s; checkpoints in {args.checkpoint_dir}", file=sys.stderr)
        return 0
    card = publish(trained, bundle, out, recipe, command, device, reused)
    test = card["accuracy"]["test"]
    print(
        f"wrote {out}: test main {test['main']:.4f}, edge cascade {test['edge_cascade']:.4f}, "
        f"cloud {test['cloud']:.4f}, cascade {test['cascade']:.4f} "
        f"at offload {test['offload_fraction']:.3f}; "
        f"hard classes {card['hard_classes']}; tau {card['thresholds']['entropy_tau']}; "
        f"{time.perf_counter() - t0:.0f} s in all",
    )
    logger.info("done")
    return 0
