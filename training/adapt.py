"""The adaptation loop (issue 16 point 5): the cloud's kept inputs make a new model version.

Two steps, each optional, in this order:

1. **Test-time adaptation of the cloud model's normalisation** (BatchNorm adaptation, Schneider et al.,
   "Improving robustness against common corruptions by covariate shift adaptation", NeurIPS 2020): every
   BatchNorm's statistics are re-estimated on the recent traffic (the kept inputs) and mixed with the
   training statistics by their counts, `prior` pseudo-samples of source against n of traffic (their N; 0:
   the traffic's alone). No label is needed and no weight changes.
2. **The edge blocks retrained on cloud labels**: the main and extension blocks fine-tuned on the kept inputs
   labelled by the (adapted) cloud model, mixed half and half with clean training images and their true
   labels so that the clean task is not forgotten; the thresholds are calibrated again on clean validation
   as `edgecascade train` does, and the drift reference becomes the new main block's outputs on the traffic
   (the new normal: the devices that run it are no longer drifting).

The result is a model directory like `edgecascade train` writes, whose card has an `adaptation` section:
what it was adapted on (file, samples, time span, devices) and what each step changed on a held-out part of
the traffic (agreement with the adapted cloud) and, when a labelled evaluation set is given, accuracy.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from cloud_worker.keep import KeptSample
from training.datasets import DatasetBundle, TensorSplit
from training.engine import OptimConfig, train_stage

logger = logging.getLogger(__name__)

DEFAULT_PRIOR = 0  # Schneider et al.'s N: pseudo-samples of the training statistics (0: the traffic's alone)


@dataclass
class Traffic:
    """Kept inputs split into what adaptation uses and a held-out part it is judged on (by time: the
    newest `holdout` share, as the next traffic would be)."""

    adapt: torch.Tensor  # uint8 [N, C, H, W]
    holdout: torch.Tensor
    source: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_kept(cls, kept: Sequence[KeptSample], holdout: float, source: str) -> Traffic:
        if len(kept) < 10:
            raise ValueError(f"{len(kept)} kept inputs: too few to adapt on (keep more: --keep-max)")
        images = torch.from_numpy(np.stack([k.tensor for k in kept]))
        cut = int(round(len(kept) * (1.0 - holdout)))
        facts = {
            "kept_inputs": source,
            "samples": len(kept),
            "adapted_on": cut,
            "held_out": len(kept) - cut,
            "first_unix": kept[0].ts_unix,
            "last_unix": kept[-1].ts_unix,
            "devices": sorted({k.device_id for k in kept}),
        }
        return cls(images[:cut], images[cut:], facts)


def _batches(images: torch.Tensor, size: int = 256) -> List[torch.Tensor]:
    return list(torch.split(images, size))


def adapt_batchnorm(model: nn.Module, images: torch.Tensor, prior: int = DEFAULT_PRIOR) -> nn.Module:
    """A copy of `model` whose BatchNorm statistics are those of `images`, mixed with its own by count
    (`prior` pseudo-samples of the old ones against len(images) of the new)."""
    adapted = copy.deepcopy(model).eval()
    norms = [m for m in adapted.modules() if isinstance(m, nn.BatchNorm2d)]
    old = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]  # type: ignore[union-attr]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch seen
        m.train()
    with torch.no_grad():
        for batch in _batches(images):
            adapted(batch)
    n = len(images)
    weight = prior / (prior + n)
    for m, (mean, var) in zip(norms, old):
        assert m.running_mean is not None and m.running_var is not None
        m.running_mean.mul_(1 - weight).add_(weight * mean)
        m.running_var.mul_(1 - weight).add_(weight * var)
        m.eval()
    return adapted


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = [model(b) for b in _batches(images)]
    return torch.cat([o[0] if isinstance(o, tuple) else o for o in out]).argmax(1)


def fine_tune_edge(
    main: nn.Module,
    extension: nn.Module,
    hard_classes: List[int],
    images: torch.Tensor,
    labels: torch.Tensor,
    bundle: DatasetBundle,
    epochs: int,
    seed: int = 0,
    progress: bool = False,
) -> Dict[str, Dict[str, float]]:
    """Main, then extension, fine-tuned on `images` with the cloud's `labels`, each batch half clean
    training images with their labels (as many as there are traffic images)."""
    generator = torch.Generator().manual_seed(seed)
    clean = bundle.train.subset(torch.randperm(len(bundle.train), generator=generator)[: len(images)])
    mixed = TensorSplit(
        torch.cat([images, clean.images]),  # type: ignore[union-attr]
        torch.cat([labels, clean.labels]),
    )
    cfg = OptimConfig(epochs=epochs, max_lr=0.01)
    stats = {
        "main": train_stage(
            "adapt main",
            list(main.parameters()),
            [main],
            [],
            lambda x: main(x)[0],
            mixed,
            cfg,
            torch.device("cpu"),
            seed,
            progress=progress,
        )
    }
    main.eval()
    hard = torch.as_tensor(hard_classes)
    label_map = torch.full((bundle.num_classes,), -1, dtype=torch.long)
    label_map[hard] = torch.arange(len(hard))
    on_hard = mixed.subset(torch.nonzero(torch.isin(mixed.labels, hard)).flatten())
    for p in main.parameters():
        p.requires_grad_(False)

    def ext_forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            _, feats = main(x)
        return extension(x, feats)

    stats["extension"] = train_stage(
        "adapt extension",
        list(extension.parameters()),
        [extension],
        [main],
        ext_forward,
        on_hard,
        cfg,
        torch.device("cpu"),
        seed + 1,
        label_map=label_map,
        progress=progress,
    )
    for p in main.parameters():
        p.requires_grad_(True)
    extension.eval()
    return stats


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).double().mean())
