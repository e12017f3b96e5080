"""Calibrate thresholds on validation, export + check ONNX blocks, count costs, write the model cards."""

from __future__ import annotations

import json
import logging
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from device_agent.card import NO_GATE
from device_agent.drift import INPUT_FEATURES, REFERENCE_KEY
from training.datasets import DatasetBundle, Split
from training.drift_profile import source_text, split_images, write_reference
from training.engine import collect
from training.export import check_against_torch, count_costs, export_block
from training.pipeline import Recipe, Trained, save_checkpoint
from training.reference import calibrate_gate, calibrate_thresholds, cascade_metrics

logger = logging.getLogger(__name__)

FILES = {"main": "main.onnx", "extension": "extension.onnx", "cloud": "cloud.onnx"}
TORCH_DIR = "torch"  # state dicts: the torch reference for the agreement test, and what training resumes


@dataclass
class ReusedCloud:
    """The cloud block of another model directory, published unchanged: run with onnxruntime, facts copied."""

    onnx_path: Path
    block: Dict[str, Any]  # its card's blocks.cloud
    facts: Dict[str, Any]  # its card's training.stages.cloud
    logits: Callable[[Any], Any]  # uint8 numpy batch -> numpy logits

    @classmethod
    def open(cls, model_dir: Path, bundle: DatasetBundle) -> ReusedCloud:
        from cloud_worker.model import CloudSession
        from device_agent.card import load_card, sha256_file

        card = load_card(model_dir)  # ModelCardError (a ValueError) on a missing or broken card
        if (card.dataset, card.num_classes, card.input_shape) != (
            bundle.name,
            bundle.num_classes,
            bundle.input_shape,
        ):
            raise ValueError(
                f"{model_dir}: its cloud block is for {card.dataset} ({card.num_classes} classes, input "
                f"{card.input_shape}), not {bundle.name} ({bundle.num_classes} classes, {bundle.input_shape})"
            )
        path = card.block_path("cloud")
        if sha256_file(path) != card.blocks["cloud"].sha256:
            raise ValueError(f"{path} does not match the sha256 in {model_dir}/card.json")
        facts = dict(card.training.get("stages", {}).get("cloud", {}))
        facts["reused_from"] = f"{model_dir} (sha256 {card.blocks['cloud'].sha256[:16]})"
        return cls(path, dict(card.raw["blocks"]["cloud"]), facts, CloudSession(path).logits)


def outputs_on(
    trained: Trained, split: Split, device: torch.device, reused: Optional[ReusedCloud] = None
) -> Dict[str, torch.Tensor]:
    """Logits of every block on a split (extension on every row, as the reference rule expects)."""
    main, ext, cloud = trained.main, trained.extension, trained.cloud

    def fn(x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        logits, feats = main(x)
        if reused is not None:
            return logits, ext(x, feats), torch.from_numpy(reused.logits(x.cpu().numpy()))
        return logits, ext(x, feats), cloud(x)

    (main_l, ext_l, cloud_l), labels = collect(fn, split, device)
    return {"labels": labels, "main": main_l, "extension": ext_l, "cloud": cloud_l}


def _round(d: Dict[str, float]) -> Dict[str, float]:
    return {k: (int(v) if k == "samples" else round(float(v), 5)) for k, v in d.items()}


def publish(
    trained: Trained,
    bundle: DatasetBundle,
    out_dir: Path,
    recipe: Recipe,
    command: str,
    device: torch.device,
    reused: Optional[ReusedCloud] = None,
    keep_thresholds: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Everything after training: returns the card it wrote to `out_dir`.

    With `reused`, the cloud block comes from another model directory (trained.cloud is not used). With
    `keep_thresholds` (another card's `thresholds`), τ, θ and the extension gate are taken from it instead of
    calibrated on validation: an adapted version (`edgecascade adapt`) whose cloud was adapted to other data
    than the clean validation split would be calibrated against the wrong cloud.
    """
    from device_agent.card import sha256_file  # shared with the device

    out_dir.mkdir(parents=True, exist_ok=True)
    for m in (trained.main, trained.extension, trained.cloud):
        m.to(device).eval()
    if reused is not None:
        trained.stages["cloud"] = reused.facts
    val = outputs_on(trained, bundle.val, device, reused)
    test = outputs_on(trained, bundle.test, device, reused)
    hard = trained.arch.hard_classes
    gate = calibrate_gate(
        val["labels"], val["main"], val["extension"], val["cloud"], hard, recipe.max_offload
    )
    if keep_thresholds is not None:
        gate.gate = tuple(keep_thresholds.get("extension_gate", (0.0, NO_GATE)))  # type: ignore[assignment]
    logger.info(
        "extension gate %s: extension rate %.3f (ungated %.3f), val cascade %.4f (ungated %.4f)",
        gate.gate,
        gate.extension_rate,
        gate.ungated_extension_rate,
        gate.accuracy,
        gate.ungated_accuracy,
    )
    tau, hi = calibrate_thresholds(
        val["labels"],
        val["main"],
        val["extension"],
        val["cloud"],
        hard,
        recipe.max_offload,
        recipe.tolerance,
        recipe.confidence,
        gate.gate,
    )
    if keep_thresholds is not None:
        tau.threshold, hi.threshold = keep_thresholds["entropy_tau"], keep_thresholds["hi_theta"]
    logger.info(
        "calibrated tau %.5f (val offload %.3f), hi theta %.5f", tau.threshold, tau.fraction, hi.threshold
    )
    accuracy = {}
    for name, o in (("validation", val), ("test", test)):
        accuracy[name] = _round(
            cascade_metrics(
                o["labels"],
                o["main"],
                o["extension"],
                o["cloud"],
                hard,
                tau.threshold,
                hi.threshold,
                gate.gate,
            )
        )

    # ---- export + check each block on CPU
    for m in (trained.main, trained.extension, trained.cloud):
        m.cpu().eval()
    images = _batch(bundle.test, 64)
    with torch.no_grad():
        _, feats = trained.main(images)
    blocks: Dict[str, Dict[str, Any]] = {}
    for name, module, inputs in (
        ("main", trained.main, (images,)),
        ("extension", trained.extension, (images, feats)),
        ("cloud", trained.cloud, (images,)),
    ):
        path = out_dir / FILES[name]
        if name == "cloud" and reused is not None:
            if reused.onnx_path.resolve() != path.resolve():
                shutil.copyfile(reused.onnx_path, path)
            blocks[name] = {**reused.block, "file": FILES[name]}
            continue
        export_block(module, name, images[:2], path, feats[:2] if name == "extension" else None)
        diff = check_against_torch(module, name, path, images, feats if name == "extension" else None)
        costs = count_costs(module, inputs)
        blocks[name] = {
            "file": FILES[name],
            "sha256": sha256_file(path),
            **costs,
            "max_abs_diff_vs_torch": diff,
        }
    # The cloud's checkpoint too: the adaptation loop (`edgecascade adapt`) trains and adapts it.
    for name, module in (("main", trained.main), ("extension", trained.extension), ("cloud", trained.cloud)):
        if name == "cloud" and reused is not None:
            continue
        save_checkpoint(
            out_dir / TORCH_DIR / f"{name}.pt", module, trained.arch, recipe, trained.stages[name]
        )

    import onnx
    import onnxruntime

    stage_seconds = {s: float(f.get("seconds", 0.0)) for s, f in trained.stages.items()}
    card: Dict[str, Any] = {
        "schema": 1,
        "dataset": bundle.name,
        "backbone": trained.arch.backbone,
        "num_classes": bundle.num_classes,
        "class_names": bundle.class_names,
        "input": {"shape": bundle.input_shape, "dtype": "uint8", "layout": "CHW"},
        "hard_classes": sorted(hard),
        "hard_class_names": [bundle.class_names[c] for c in sorted(hard)],
        "hard_mode": recipe.hard_mode,
        "thresholds": {
            "entropy_tau": round(tau.threshold, 6),
            "hi_theta": round(hi.threshold, 6),
            "calibrated_on": (
                f"validation ({len(bundle.val)} images carved from train, seed {recipe.seed})"
                if keep_thresholds is None
                else f"kept from the version it was made from: {keep_thresholds.get('calibrated_on')}"
            ),
            "target_offload_fraction": recipe.max_offload,
            "tolerance_vs_cloud": recipe.tolerance,
            "confidence": recipe.confidence,
            "entropy_tau_met_target": tau.met_target,
            "hi_theta_met_target": hi.met_target,
            # The band of the main block's max-softmax where the extension runs (device_agent.card).
            "extension_gate": [round(v, 6) for v in gate.gate],
            "extension_gate_calibration": {
                "extension_rate": round(gate.extension_rate, 4),
                "ungated_extension_rate": round(gate.ungated_extension_rate, 4),
                "cascade_accuracy": round(gate.accuracy, 4),
                "ungated_cascade_accuracy": round(gate.ungated_accuracy, 4),
                "at_offload_fraction": gate.fraction,
            },
        },
        "blocks": blocks,
        "accuracy": accuracy,
        "architecture": trained.arch.to_dict(),
        "torch_reference": {
            n: f"{TORCH_DIR}/{n}.pt" for n in ("main", "extension", "cloud") if n != "cloud" or reused is None
        },
        "training": {
            # the command of this run; stages loaded from --checkpoint-dir name their own command below
            "command": command,
            "reproduce": "make train  (= edgecascade train --out models/" + bundle.name + ")",
            "seed": recipe.seed,
            "device": "+".join(sorted({str(f.get("device", device.type)) for f in trained.stages.values()})),
            "torch": "+".join(
                sorted({str(f.get("torch", torch.__version__)) for f in trained.stages.values()})
            ),
            "epochs": {s: int(f.get("epochs", 0)) for s, f in trained.stages.items()},
            "seconds": round(sum(stage_seconds.values()), 1),
            "stage_seconds": stage_seconds,
            "stages": trained.stages,
            "recipe": trained.recipe,
            "export": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "opset": 17,
                "python": platform.python_version(),
            },
        },
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    # The device's drift monitor compares its inputs with this (the exported main block on validation).
    card = write_reference(
        out_dir, split_images(bundle.val), source_text(out_dir, len(bundle.val), recipe.seed)
    )
    (out_dir / "MODEL_CARD.md").write_text(model_card_markdown(card), encoding="utf-8")
    return card


def drift_reference_lines(card: Dict[str, Any]) -> List[str]:
    ref = card.get(REFERENCE_KEY)
    if ref is None:
        return []
    inputs = [f for f in ref["features"] if f in INPUT_FEATURES]
    outputs = len(ref["features"]) - len(inputs)
    watched = f"{outputs} outputs (confidence, then each class's softmax)"
    if inputs:
        watched += f" and of {len(inputs)} statistics of the input image ({', '.join(inputs)})"
    return [
        f"- drift reference (`{REFERENCE_KEY}`): {ref['levels']} quantiles of each of the main block's "
        f"{watched} on {ref['source']}; the device's drift monitor tests its recent samples against them "
        "(`device_agent/drift.py`)"
    ]


def gate_lines(th: Dict[str, Any]) -> List[str]:
    if "extension_gate" not in th:
        return []
    low, high = th["extension_gate"]
    g = th["extension_gate_calibration"]
    return [
        f"- extension gate: the extension runs for a hard top-1 whose main max-softmax is in [{low:g}, "
        f"{high:g}) (2 = no upper bound): on validation it ran for {_pct(g['extension_rate'])} of samples "
        f"instead of {_pct(g['ungated_extension_rate'])}, the cascade at {g['at_offload_fraction']:.0%} "
        f"offloaded {_pct(g['cascade_accuracy'])} vs {_pct(g['ungated_cascade_accuracy'])} ungated "
        "(`training.reference.calibrate_gate`: the lowest rate within 0.1 pp)"
    ]


def _batch(split: Split, n: int) -> torch.Tensor:
    images, _ = next(iter(split.batches(n)))
    return images.cpu()


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.2f} %"


def model_card_markdown(card: Dict[str, Any]) -> str:
    """A human-readable card with the same facts as card.json."""
    acc = card["accuracy"]
    tr = card["training"]
    th = card["thresholds"]
    hard_names = ", ".join(f"{c} {n}" for c, n in zip(card["hard_classes"], card["hard_class_names"]))
    lines = [
        f"# Model card: MEANet edge cascade on {card['dataset']} ({card['backbone']})",
        "",
        "Main block (edge, all classes) → extension block (edge, hard classes only, fed the main block's "
        "last feature map and an adaptive CNN over the raw image) → cloud model (all classes) for inputs "
        "whose "
        "edge answer has a normalised entropy above τ. Inputs are raw uint8 pixels "
        f"{card['input']['shape']} (CHW); normalisation is inside each ONNX graph (opset 17, batch-dynamic).",
        "",
        f"- hard classes: {hard_names} ({card['hard_mode']} on validation)",
        f"- τ (entropy) = {th['entropy_tau']}, hi-threshold θ (max softmax) = {th['hi_theta']}; "
        f"calibrated on {th['calibrated_on']}: smallest offload fraction ≤ "
        f"{th['target_offload_fraction']:.0%} whose cascade accuracy stays within "
        f"{100 * th['tolerance_vs_cloud']:.1f} pp of the cloud's on unseen data with "
        f"{100 * th.get('confidence', 0.5):.0f} % confidence (paired normal bound)"
        + (
            ""
            if th.get("entropy_tau_met_target", True)
            else "; no fraction within the cap could promise that on this validation split, so τ is the "
            "most accurate fraction within the cap (shrunk by the same margin)"
        ),
        *gate_lines(th),
        *drift_reference_lines(card),
        "",
        "## Blocks (per image)",
        "",
        "| block | file | MACs | params | bytes moved | max abs diff ORT vs torch | sha256 |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, b in card["blocks"].items():
        lines.append(
            f"| {name} | {b['file']} | {b['macs']:,} | {b['params']:,} | {b['bytes_moved']:,} | "
            f"{b.get('max_abs_diff_vs_torch', 0):.2g} | `{b['sha256'][:16]}…` |"
        )
    lines += [
        "",
        "## Accuracy",
        "",
        "| | validation | test |",
        "| --- | ---: | ---: |",
    ]
    labels = {
        "main": "main block alone",
        "main_on_hard": "main block, hard-class samples",
        "edge_on_hard": "main + extension, hard-class samples",
        "extension_on_hard": "extension alone, hard-class samples",
        "edge_cascade": "edge cascade (main + extension, ungated: edge-only)",
        "cloud": "cloud model alone",
        "cascade": "full cascade (MEANet rule, τ)",
        "offload_fraction": "offloaded to the cloud (τ)",
        "hi_cascade": "hi-threshold cascade (θ)",
        "hi_offload_fraction": "offloaded to the cloud (θ)",
        "extension_rate": "extension block ran (meanet, gated)",
        "extension_rate_ungated": "extension block ran (ungated)",
    }
    for key, label in labels.items():
        lines.append(f"| {label} | {_pct(acc['validation'].get(key))} | {_pct(acc['test'].get(key))} |")
    lines += [
        "",
        f"Samples: validation {acc['validation']['samples']}, test {acc['test']['samples']}.",
        "",
        "## Training",
        "",
        f"- reproduce: `{tr['reproduce']}` (seed {tr['seed']})",
        f"- calibrated and exported by: `{tr['command']}` with torch {tr['export']['torch']}, onnx "
        f"{tr['export']['onnx']}, onnxruntime {tr['export']['onnxruntime']}",
        f"- training: {tr['seconds']:.0f} s in all on {tr['device']}; per stage:",
    ]
    for name, f in tr["stages"].items():
        lines.append(
            f"  - {name}: {f.get('epochs')} epochs, {f.get('seconds')} s on {f.get('device')} "
            f"{f.get('device_name', '')} (torch {f.get('torch')}), final train loss {f.get('train_loss')}, "
            f"train accuracy {f.get('train_accuracy')}; `{f.get('command', '')}`"
        )
    lines += [
        "",
        "Reproduce with `make train`. Thresholds were fitted on the validation split only; the test split "
        "was only evaluated.",
        "",
    ]
    return "\n".join(lines)


def main_command() -> str:
    """The command line as typed (for the card)."""
    argv = list(sys.argv)
    prog = Path(argv[0]).name if argv else "edgecascade"
    return " ".join(["edgecascade" if prog in ("edgecascade", "__main__.py", "cli.py") else prog, *argv[1:]])
