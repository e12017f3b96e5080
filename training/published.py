"""A published model directory (card.json, ONNX blocks, torch/*.pt) back as torch modules, to train on.

Main and extension come from their torch checkpoints; the cloud model from `torch/cloud.pt` where the
directory has one, else rebuilt from `cloud.onnx` (`from_onnx.load_folded`, the statistics measured on the
first training images: the directory published before cloud checkpoints were kept).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from device_agent.card import NO_GATE
from training.from_onnx import load_folded
from training.meanet import Architecture, CloudNet, ExtensionBlock, MainBlock, build_models
from training.pipeline import load_checkpoint

STATISTICS_IMAGES = 5000  # clean training images for the rebuilt cloud model's BatchNorm statistics


@dataclass
class Published:
    arch: Architecture
    main: MainBlock
    extension: ExtensionBlock
    cloud: CloudNet
    stages: Dict[str, Dict[str, Any]]  # the card's training facts per stage
    source: str  # "<dir> (card sha256 <12 hex>)": what a model trained from it names
    card: Dict[str, Any]  # its card.json

    @property
    def recipe(self) -> Dict[str, Any]:
        return dict(self.card.get("training", {}).get("recipe", {}))

    @property
    def gate(self) -> Tuple[float, float]:
        low, high = self.card["thresholds"].get("extension_gate", (0.0, NO_GATE))
        return float(low), float(high)


def load_published(model_dir: Path, clean_images: Optional[torch.Tensor] = None) -> Published:
    """`clean_images` (uint8, training images) are needed only to rebuild a cloud model from its ONNX."""
    from device_agent.card import sha256_file

    card = json.loads((model_dir / "card.json").read_text(encoding="utf-8"))
    arch = Architecture.from_dict(card["architecture"])
    main, extension, cloud = build_models(arch, card["input"]["shape"])
    for name, module in (("main", main), ("extension", extension), ("cloud", cloud)):
        path = model_dir / "torch" / f"{name}.pt"
        if path.is_file():
            saved = load_checkpoint(path)
            if saved["arch"]["hard_classes"] != arch.hard_classes:
                raise ValueError(f"{path} was trained for other hard classes than {model_dir}/card.json")
            module.load_state_dict(saved["state_dict"])
        elif name == "cloud" and clean_images is not None:
            images = clean_images[:STATISTICS_IMAGES]
            load_folded(cloud, model_dir / card["blocks"]["cloud"]["file"], torch.split(images, 500))
        else:
            hint = " (and no clean images to rebuild it from its ONNX)" if name == "cloud" else ""
            raise ValueError(f"{model_dir} has no {path.name}{hint}: cannot train on from it")
    stages = card.get("training", {}).get("stages", {})
    source = f"{model_dir} (card sha256 {sha256_file(model_dir / 'card.json')[:12]})"
    return Published(arch, main.eval(), extension.eval(), cloud.eval(), stages, source, card)
