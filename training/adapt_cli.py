"""CLI for `edgecascade adapt`: a new model version from the inputs the cloud kept (`training/adapt.py`)."""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

logger = logging.getLogger(__name__)

HELP = "Adapt the models to recent traffic: cloud BatchNorm statistics, edge blocks on cloud labels"
DESCRIPTION = (
    "Read the offloaded inputs a cloud worker kept (edgecascade cloud --keep-inputs), adapt the cloud "
    "model's normalisation statistics to them, retrain the edge blocks on the adapted cloud's answers, "
    "calibrate again, and write a new model directory whose card says what it was adapted on and what "
    "each step changed. Publish it to the fleet with `edgecascade models publish`."
)
EPILOG = """examples:
  edgecascade adapt --models models/fashion-mnist --kept /var/lib/edgecascade/kept.db --out build/adapted
  edgecascade adapt ... --steps tta                 # the cloud's statistics only (seconds, no training)
  edgecascade adapt ... --since-h 6 --limit 5000    # the newest 5,000 inputs of the last six hours
  edgecascade adapt ... --eval-corruption gaussian-noise-2 --eval-range 5000:10000   # + labelled figures
"""

STEPS = ("tta", "edge")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models", type=Path, default=Path("models/fashion-mnist"), help="the version now served"
    )
    parser.add_argument("--kept", type=Path, required=True, help="the SQLite file of kept inputs")
    parser.add_argument("--out", type=Path, required=True, help="where the new model directory goes")
    parser.add_argument(
        "--steps", default="tta,edge", help="of tta (cloud BatchNorm statistics), edge (retrain the edge)"
    )
    parser.add_argument("--since-h", type=float, help="only inputs kept in the last this many hours")
    parser.add_argument("--limit", type=int, help="only the newest this many inputs")
    parser.add_argument("--holdout", type=float, default=0.2, help="newest share held out to judge by")
    parser.add_argument("--prior", type=int, default=0, help="pseudo-samples of the old statistics (N)")
    parser.add_argument("--epochs", type=int, default=2, help="edge fine-tuning epochs (default %(default)s)")
    parser.add_argument("--data-dir", help="Fashion-MNIST directory (default: the Debian package's)")
    parser.add_argument(
        "--eval-corruption", help="also measure accuracy on test images with this corruption (e.g. blur-2)"
    )
    parser.add_argument("--eval-range", default="5000:10000", help="test images to measure on (start:end)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from cloud_worker.keep import read_kept
    from device_agent.card import load_card
    from training.adapt import Traffic, adapt_batchnorm, fine_tune_edge, predict
    from training.datasets import DatasetError, load_dataset
    from training.drift_profile import card_text, write_reference
    from training.pipeline import Recipe, Trained
    from training.publish import main_command, model_card_markdown, publish
    from training.published import load_published

    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not steps or set(steps) - set(STEPS):
        print(f"error: --steps takes {','.join(STEPS)}, got {args.steps!r}", file=sys.stderr)
        return 2
    if not 0.0 < args.holdout < 1.0:
        print(f"error: --holdout must be a share in (0, 1), got {args.holdout}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        since = time.time() - 3600.0 * args.since_h if args.since_h else None
        kept = read_kept(args.kept, since, args.limit)
        traffic = Traffic.from_kept(kept, args.holdout, str(args.kept))
        card = json.loads((args.models / "card.json").read_text(encoding="utf-8"))
        recipe = card.get("training", {}).get("recipe", {})
        # The clean splits exactly as the served version was trained and calibrated on them.
        bundle = load_dataset(
            card["dataset"],
            args.data_dir,
            val_size=int(recipe.get("val_size", 5000)),
            seed=int(card["training"]["seed"]),
        )
        start = load_published(args.models, bundle.train.images)  # type: ignore[union-attr]
    except (FileNotFoundError, KeyError, ValueError, DatasetError, sqlite3.Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"adapting {args.models} on {traffic.source['adapted_on']} kept inputs "
        f"({traffic.source['held_out']} held out) from {len(traffic.source['devices'])} devices",
        file=sys.stderr,
    )
    evaluation = _evaluation_set(args, bundle)
    before = {"cloud": start.cloud, "main": start.main, "extension": start.extension}
    cloud = adapt_batchnorm(start.cloud, traffic.adapt, args.prior) if "tta" in steps else start.cloud
    main, extension = start.main, start.extension
    if "edge" in steps:
        labels = predict(cloud, traffic.adapt)
        main, extension = _copy(main), _copy(extension)
        fine_tune_edge(
            main,
            extension,
            start.arch.hard_classes,
            traffic.adapt,
            labels,
            bundle,
            args.epochs,
            progress=not args.no_progress,
        )
    figures = _figures(
        start.gate,
        float(start.card["thresholds"]["entropy_tau"]),
        before,
        {"cloud": cloud, "main": main, "extension": extension},
        traffic,
        evaluation,
        start.arch.hard_classes,
    )
    stages = {
        name: {**start.stages.get(name, {}), "adapted": name in _changed(steps)}
        for name in ("main", "extension", "cloud")
    }
    recipe = Recipe(**{k: v for k, v in start.recipe.items() if k in Recipe.__dataclass_fields__})
    trained = Trained(start.arch, main, extension, cloud, stages, recipe.to_dict())  # type: ignore[arg-type]
    # Thresholds and gate stay the served version's: the clean validation split says nothing about a cloud
    # adapted to other inputs (calibrated there, it would offload almost nothing).
    card = publish(
        trained,
        bundle,
        args.out,
        recipe,
        main_command(),
        torch.device("cpu"),
        keep_thresholds=start.card["thresholds"],
    )
    if "edge" in steps:
        # The new normal is the traffic the edge was retrained on: drift monitors compare with it.
        card = write_reference(
            args.out,
            traffic.adapt.numpy(),
            f"recent traffic ({traffic.source['adapted_on']} kept inputs of {args.kept})",
        )
    card["adaptation"] = {
        "from": start.source,
        "steps": steps,
        "prior": args.prior,
        "edge_epochs": args.epochs if "edge" in steps else 0,
        "traffic": traffic.source,
        "figures": figures,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (args.out / "card.json").write_text(card_text(card), encoding="utf-8")
    load_card(args.out)  # it reads back
    (args.out / "MODEL_CARD.md").write_text(
        model_card_markdown(card) + _markdown(card["adaptation"]), encoding="utf-8"
    )
    print(json.dumps({"out": str(args.out), **card["adaptation"]["figures"]}, indent=2))
    return 0


def _changed(steps: list) -> set:
    return ({"cloud"} if "tta" in steps else set()) | ({"main", "extension"} if "edge" in steps else set())


def _copy(module: Any) -> Any:
    import copy

    return copy.deepcopy(module)


def _evaluation_set(args: argparse.Namespace, bundle: Any) -> Optional[Dict[str, Any]]:
    """Labelled test images (corrupted as asked): how the figures become accuracies. Never adapted on."""
    if not args.eval_corruption:
        return None
    import torch

    from training.corruptions import Corruption, corrupt

    first, last = (int(x) for x in args.eval_range.split(":"))
    images = bundle.test.images[first:last].numpy()
    indices = list(range(first, first + len(images)))
    corrupted = corrupt(images, Corruption.parse(args.eval_corruption), indices=indices)
    return {
        "name": args.eval_corruption,
        "range": args.eval_range,
        "clean": bundle.test.images[first:last],
        "images": torch.from_numpy(corrupted),
        "labels": bundle.test.labels[first:last],
    }


def _figures(
    gate: Any,
    tau: float,
    before: Dict[str, Any],
    after: Dict[str, Any],
    traffic: Any,
    evaluation: Any,
    hard: list,
) -> Dict[str, Any]:
    """Agreement on the held-out traffic; with `evaluation`, accuracies of each part and of the cascade (the
    kept gate and τ: what a device serving the version answers, complex samples by the version's cloud)."""
    import torch

    from training.adapt import agreement, predict
    from training.reference import edge_rule

    def edge_of(main: Any, extension: Any, images: torch.Tensor) -> Any:
        with torch.no_grad():
            logits, feats = main(images)
            return edge_rule(logits, extension(images, feats), hard, gate)

    def edge_pred(main: Any, extension: Any, images: torch.Tensor) -> torch.Tensor:
        return edge_of(main, extension, images).prediction

    held = traffic.holdout
    cloud_after = predict(after["cloud"], held)
    out: Dict[str, Any] = {
        "held_out": int(len(held)),
        "cloud_before_agrees_with_adapted_cloud": agreement(predict(before["cloud"], held), cloud_after),
        "edge_before_agrees_with_adapted_cloud": agreement(
            edge_pred(before["main"], before["extension"], held), cloud_after
        ),
        "edge_after_agrees_with_adapted_cloud": agreement(
            edge_pred(after["main"], after["extension"], held), cloud_after
        ),
    }
    if evaluation is not None:
        y = evaluation["labels"]
        for when, models in (("before", before), ("after", after)):
            for split in ("images", "clean"):
                key = "corrupted" if split == "images" else "clean"
                x = evaluation[split]
                out[f"{key}_cloud_accuracy_{when}"] = agreement(predict(models["cloud"], x), y)
                edge = edge_of(models["main"], models["extension"], x)
                out[f"{key}_edge_accuracy_{when}"] = agreement(edge.prediction, y)
                cascade = torch.where(edge.entropy > tau, predict(models["cloud"], x), edge.prediction)
                out[f"{key}_cascade_accuracy_{when}"] = agreement(cascade, y)
                out[f"{key}_offloaded_{when}"] = float((edge.entropy > tau).double().mean())
        out["evaluation"] = f"test images {evaluation['range']}, {evaluation['name']} (never adapted on)"
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _markdown(adaptation: Dict[str, Any]) -> str:
    f = adaptation["figures"]
    lines = [
        "",
        "## Adaptation",
        "",
        f"Adapted from {adaptation['from']} by `edgecascade adapt` "
        f"(steps: {', '.join(adaptation['steps'])}) on {adaptation['traffic']['adapted_on']} inputs the "
        f"cloud kept ({adaptation['traffic']['kept_inputs']}), {adaptation['traffic']['held_out']} held out.",
        "",
        "| figure | value |",
        "| --- | ---: |",
    ]
    lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in f.items()]
    return "\n".join(lines) + "\n"
