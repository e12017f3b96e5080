"""Weight-space ensembles of a clean model directory and its robust fine-tunes (WiSE-FT, Wortsman et al.
2022).

Why: fine-tuning under corruptions cost the small edge blocks 0.6-1.2 pp of clean accuracy in every recipe
tried on this CPU. Interpolating each weight between the clean block and its fine-tune, θ(α) = (1 - α) θ_clean
+ α θ_robust, trades one for the other along a path (on this data it keeps too little robustness within
0.3 pp: README, "Robust models"). α is chosen on the validation split
only (the test split stays unseen): the largest share of robust weights whose clean validation accuracy stays
within `--budget` of the clean block's, on a grid of `--steps`. What each α keeps of the robustness is
reported beside it (the corruption suite at severity 2 on validation images, `--robustness-images`), not used
to choose.

The edge pair interpolates its state dicts (main and extension with one α: the extension reads the main
block's features), as WiSE-FT does. The cloud model interpolates each convolution's folded affine map (its
weights times BatchNorm's scale, and the folded bias): the clean cloud exists only as folded ONNX, rebuilt
with measured statistics (`from_onnx`), so its BatchNorm parameters are not comparable with a trained
module's, but the map each convolution computes is. Its statistics are then measured on clean images again.

The output is a checkpoint directory of all three blocks (those not mixed are the clean ones); publish it with
`edgecascade train --init-from CLEAN --checkpoint-dir OUT --out MODEL_DIR`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from training.datasets import Split, TensorSplit
from training.engine import collect
from training.from_onnx import conv_bn_pairs, fold_in
from training.meanet import Architecture, build_models
from training.pipeline import Recipe, load_bundle, load_checkpoint, save_checkpoint
from training.published import STATISTICS_IMAGES, load_published
from training.reference import cascade_metrics

logger = logging.getLogger(__name__)

EPILOG = """examples:
  python -m training.wise --clean models/fashion-mnist --robust-edge build/ftedge-ckpt \\
      --robust-cloud build/cloud3-ckpt --out build/wise-ckpt
  edgecascade train --init-from models/fashion-mnist --checkpoint-dir build/wise-ckpt --out build/robust
"""


def _lerped(clean: nn.Module, robust: nn.Module, alpha: float) -> Dict[str, torch.Tensor]:
    """Every floating tensor of the state dict at (1 - alpha) clean + alpha robust; integer buffers
    (BatchNorm's batch counters) from the robust module."""
    a, b = clean.state_dict(), robust.state_dict()
    return {k: torch.lerp(a[k], b[k], alpha) if b[k].is_floating_point() else b[k] for k in b}


def mix_states(clean: nn.Module, robust: nn.Module, alpha: float, into: nn.Module) -> nn.Module:
    """`into` with its state dict interpolated (`_lerped`)."""
    into.load_state_dict(_lerped(clean, robust, alpha))
    return into.eval()


def folded_maps(module: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Each convolution's weights and bias with the BatchNorm after it folded in (eval mode), in order."""
    maps = []
    for conv, bn in conv_bn_pairs(module):
        assert bn.running_mean is not None and bn.running_var is not None  # BatchNorm2d tracks them
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        bias = bn.bias.detach() - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias.detach() * scale
        maps.append((conv.weight.detach() * scale[:, None, None, None], bias))
    return maps


def mix_folded(
    clean: nn.Module, robust: nn.Module, alpha: float, into: nn.Module, clean_batches: Sequence[torch.Tensor]
) -> nn.Module:
    """`into` computing, in each convolution, the interpolated folded map; the other weights (the classifier)
    interpolated as they are; BatchNorm statistics measured on `clean_batches`."""
    pairs = conv_bn_pairs(into)
    names = {m: name for name, m in into.named_modules()}
    folded = tuple(f"{names[m]}." for pair in pairs for m in pair)
    rest = {k: v for k, v in _lerped(clean, robust, alpha).items() if not k.startswith(folded)}
    into.load_state_dict(rest, strict=False)
    biases: Dict[nn.Conv2d, torch.Tensor] = {}
    for (conv, _bn), (wa, ba), (wb, bb) in zip(pairs, folded_maps(clean), folded_maps(robust), strict=True):
        conv.weight.data.copy_(torch.lerp(wa, wb, alpha))
        biases[conv] = torch.lerp(ba, bb, alpha)
    fold_in(into, dict(pairs), biases, clean_batches)
    return into.eval()


def accuracy(model: nn.Module, split: Split) -> float:
    with torch.no_grad():
        (pred,), labels = collect(lambda x: (model(x).argmax(1),), split, torch.device("cpu"))
    return float((pred.long() == labels).float().mean())


def edge_accuracy(main: nn.Module, ext: nn.Module, hard: List[int], split: Split) -> Dict[str, float]:
    """The main block's accuracy and the edge cascade's (the extension ungated, as edge-only runs it)."""

    def both(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, feats = main(x)
        return logits, ext(x, feats)

    with torch.no_grad():
        (main_logits, ext_logits), labels = collect(both, split, torch.device("cpu"))
    metrics = cascade_metrics(labels, main_logits, ext_logits, None, hard)
    return {"main": metrics["main"], "edge_cascade": metrics["edge_cascade"]}


def corrupted_validation(split: Split, count: int) -> Split:
    """The first `count` validation images under every kind of the suite at severity 2, labels repeated."""
    from training.corruptions import KINDS, Corruption, corrupt

    images, labels = next(iter(split.batches(count)))
    out = [torch.from_numpy(corrupt(images.numpy(), Corruption(kind, 2))) for kind in KINDS]
    return TensorSplit(torch.cat(out), labels.repeat(len(out)))


def choose(table: List[Dict[str, float]], keys: Sequence[str], budget: float) -> Dict[str, float]:
    """The row of largest alpha whose `keys` all stay within `budget` of the alpha = 0 row's (a smaller alpha
    may fall outside it: validation accuracy is not monotone in alpha to a tenth of a point)."""
    base = table[0]
    within = [row for row in table if all(row[k] >= base[k] - budget for k in keys)]
    return max(within, key=lambda row: row["alpha"])


def _robust(path: Path, names: Sequence[str], arch: Architecture, shape: Sequence[int]) -> Tuple[Dict, Dict]:
    """The blocks `names` of a checkpoint directory, built for `arch`, and each one's training facts."""
    modules = dict(zip(("main", "extension", "cloud"), build_models(arch, shape)))
    facts = {}
    for name in names:
        state = load_checkpoint(path / f"{name}.pt")
        if state["arch"]["hard_classes"] != arch.hard_classes:
            raise SystemExit(
                f"error: {path / name}.pt was trained for other hard classes than the clean model"
            )
        modules[name].load_state_dict(state["state_dict"])
        facts[name] = state["facts"]
    return {name: modules[name].eval() for name in names}, facts


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.wise",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clean", type=Path, required=True, help="published model directory (alpha 0)")
    parser.add_argument("--robust-edge", type=Path, help="checkpoint directory with main.pt, extension.pt")
    parser.add_argument("--robust-cloud", type=Path, help="checkpoint directory with cloud.pt")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument(
        "--budget", type=float, default=0.002, help="clean validation accuracy α may cost (default 0.2 pp)"
    )
    parser.add_argument("--steps", type=int, default=10, help="grid of alpha: 0, 1/steps, ..., 1")
    parser.add_argument(
        "--robustness-images",
        type=int,
        default=1000,
        help="validation images per corruption for the robustness column (default 1000; 0: none)",
    )
    parser.add_argument("--data-dir", help="Fashion-MNIST directory (default: Debian's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    args.command = "python -m training.wise " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.steps < 1 or not 0 <= args.budget < 1:
        parser.error("--steps must be at least 1 and --budget a share in [0, 1)")
    if not (args.robust_edge or args.robust_cloud):
        parser.error("nothing to mix: give --robust-edge and/or --robust-cloud")
    for path, names in ((args.robust_edge, ("main", "extension")), (args.robust_cloud, ("cloud",))):
        missing = [f"{name}.pt" for name in names if path and not (path / f"{name}.pt").is_file()]
        if missing:
            parser.error(f"{path} has no {', '.join(missing)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    # The clean model's own recipe carves the same validation split its thresholds were fitted on.
    card = json.loads((args.clean / "card.json").read_text(encoding="utf-8"))
    saved_recipe = card.get("training", {}).get("recipe", {})
    recipe = Recipe(**{k: v for k, v in saved_recipe.items() if k in Recipe.__dataclass_fields__})
    bundle = load_bundle(recipe, args.data_dir)
    clean = load_published(args.clean, bundle.train.images)  # type: ignore[union-attr]
    arch, shape = clean.arch, bundle.input_shape
    alphas = [i / args.steps for i in range(args.steps + 1)]
    args.out.mkdir(parents=True, exist_ok=True)
    chosen: Dict[str, Dict[str, float]] = {}
    dirty = corrupted_validation(bundle.val, args.robustness_images) if args.robustness_images else None
    if args.robust_edge:
        edge, facts = _robust(args.robust_edge, ("main", "extension"), arch, shape)
        table, pairs = [], {}
        for alpha in alphas:
            main_block, ext, _ = build_models(arch, shape)
            pairs[alpha] = (
                mix_states(clean.main, edge["main"], alpha, main_block),
                mix_states(clean.extension, edge["extension"], alpha, ext),
            )
            accuracies = edge_accuracy(main_block, ext, arch.hard_classes, bundle.val)
            if dirty is not None:
                corrupted = edge_accuracy(main_block, ext, arch.hard_classes, dirty)
                accuracies.update({f"{k}_corrupted": v for k, v in corrupted.items()})
            table.append({"alpha": alpha, **{k: round(v, 5) for k, v in accuracies.items()}})
            logger.info("edge: %s", table[-1])
        chosen["edge"] = best = choose(table, ("main", "edge_cascade"), args.budget)
        for name, module in zip(("main", "extension"), pairs[best["alpha"]]):
            _save(args, name, module, arch, recipe, best, table, facts[name])
    if args.robust_cloud:
        robust_cloud, facts = _robust(args.robust_cloud, ("cloud",), arch, shape)
        batches = list(bundle.train.images[:STATISTICS_IMAGES].split(500))  # type: ignore[union-attr]
        table, mixed = [], {}
        for alpha in alphas:
            into = build_models(arch, shape)[2]
            mixed[alpha] = mix_folded(clean.cloud, robust_cloud["cloud"], alpha, into, batches)
            row = {"alpha": alpha, "cloud": round(accuracy(mixed[alpha], bundle.val), 5)}
            if dirty is not None:
                row["cloud_corrupted"] = round(accuracy(mixed[alpha], dirty), 5)
            table.append(row)
            logger.info("cloud: %s", row)
        chosen["cloud"] = best = choose(table, ("cloud",), args.budget)
        _save(args, "cloud", mixed[best["alpha"]], arch, recipe, best, table, facts["cloud"])
    # The blocks not mixed are the clean ones, so that OUT publishes as it is (a missing stage would train).
    for name, module in (("main", clean.main), ("extension", clean.extension), ("cloud", clean.cloud)):
        if not (args.out / f"{name}.pt").exists():
            facts = {**clean.stages.get(name, {}), "kept_from": clean.source}
            save_checkpoint(args.out / f"{name}.pt", module, arch, recipe, facts)
    print(json.dumps(chosen, indent=1))
    return 0


def _save(
    args: argparse.Namespace,
    name: str,
    module: nn.Module,
    arch: Architecture,
    recipe: Recipe,
    chosen: Dict[str, float],
    table: List[Dict[str, float]],
    robust_facts: Dict,
) -> None:
    source = args.robust_cloud if name == "cloud" else args.robust_edge
    facts = {
        **robust_facts,
        "wise": {
            "alpha": chosen["alpha"],
            "clean": str(args.clean),
            "robust": str(source),
            "budget": args.budget,
            "validation": table,
            "robust_command": robust_facts.get("command"),
        },
        "command": args.command,
    }
    save_checkpoint(args.out / f"{name}.pt", module, arch, recipe, facts)


if __name__ == "__main__":
    sys.exit(main())
