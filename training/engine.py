"""Training and evaluation loops: batched on-device augmentation, SGD one-cycle, label smoothing, tqdm."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional
from tqdm.auto import tqdm

from training.augment import DEFAULT_KINDS, corrupt_batch
from training.datasets import Split, TensorSplit

logger = logging.getLogger(__name__)

# forward(images_uint8_on_device) -> logits
ForwardFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class OptimConfig:
    """The optimisation recipe shared by all stages (SGD + one-cycle, crop + flip, label smoothing)."""

    epochs: int
    batch_size: int = 128
    max_lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    label_smoothing: float = 0.05
    crop_padding: Optional[int] = None  # None: H // 8 (at least 2)
    flip: bool = True
    corruption_p: float = 0.0  # share of training images corrupted (training/augment.py) ...
    corruption_kinds: Tuple[str, ...] = DEFAULT_KINDS  # ... by one of these kinds
    # Distillation (Hinton et al. 2015): this weight of the loss is the KL divergence to a teacher's
    # probabilities at `temperature`, the rest the labels' cross-entropy. The teacher's outputs are given per
    # training row (`train_stage(soft_targets=...)`), computed once on the clean image.
    distill_weight: float = 0.0
    distill_temperature: float = 2.0


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def on_device(split: Split, device: torch.device) -> Split:
    """In-memory splits move to the device once, so batches are sliced there (no per-batch copies)."""
    if isinstance(split, TensorSplit) and device.type != "cpu":
        return TensorSplit(split.images.to(device), split.labels.to(device))
    return split


def augment(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole uint8 batch at once."""
    n, _, h, w = images.shape
    dev = images.device
    if padding > 0:
        padded = nn.functional.pad(images, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]
        batch_idx = torch.arange(n, device=dev)[:, None, None, None]
        chan_idx = torch.arange(images.shape[1], device=dev)[None, :, None, None]
        images = padded[batch_idx, chan_idx, rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(dev)
        images = torch.where(mask[:, None, None, None], images.flip(-1), images)
    return images


def train_stage(
    name: str,
    params: List[nn.Parameter],
    train_modules: List[nn.Module],
    frozen_modules: List[nn.Module],
    forward: ForwardFn,
    split: Split,
    cfg: OptimConfig,
    device: torch.device,
    seed: int,
    label_map: Optional[torch.Tensor] = None,
    progress: bool = True,
    soft_targets: Optional[torch.Tensor] = None,
) -> Dict[str, float]:
    """Train `params` for cfg.epochs; `frozen_modules` stay in eval mode (BatchNorm statistics frozen).

    `label_map` remaps dataset labels to the head's classes (stage 2: hard class id -> 0..H-1).
    `soft_targets` [N, classes of the head]: a teacher's logits for each row of `split`, which the loss
    distils with weight cfg.distill_weight (each augmented or corrupted view learns its clean image's).
    Returns the last epoch's loss/accuracy and the wall time.
    """
    if len(split) == 0:
        raise ValueError(f"{name}: no training samples")
    if not 0.0 <= cfg.corruption_p <= 1.0:
        raise ValueError(f"{name}: corruption_p must be a share in [0, 1], got {cfg.corruption_p}")
    generator = torch.Generator().manual_seed(seed)
    split = on_device(split, device)
    labels_of = None
    if soft_targets is not None:
        if not isinstance(split, TensorSplit) or soft_targets.shape[0] != len(split):
            raise ValueError(f"{name}: soft targets need an in-memory split of as many rows")
        # Batches of row numbers in place of labels: each batch then looks up its labels and its targets.
        labels_of, split = split.labels, TensorSplit(split.images, torch.arange(len(split), device=device))
        teacher = functional.log_softmax(soft_targets.to(device).float() / cfg.distill_temperature, 1)
    steps_per_epoch = (len(split) + cfg.batch_size - 1) // cfg.batch_size
    opt = torch.optim.SGD(
        params, lr=cfg.max_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.max_lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if label_map is not None:
        label_map = label_map.to(device)
    for m in train_modules:
        m.train()
    for m in frozen_modules:
        m.eval()
    _, _, h, _ = _peek_shape(split)
    padding = cfg.crop_padding if cfg.crop_padding is not None else max(2, h // 8)
    stats = {"loss": float("nan"), "accuracy": float("nan")}
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(
            split.batches(cfg.batch_size, shuffle=True, generator=generator),
            total=steps_per_epoch,
            desc=f"{name} {epoch + 1}/{cfg.epochs}",
            disable=None if progress else True,  # None: bars on a terminal only, not in logs
            leave=True,
            dynamic_ncols=True,
        )
        for images, labels in bar:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            rows = labels
            if labels_of is not None:
                labels = labels_of[rows]
            if label_map is not None:
                labels = label_map[labels]
            images = augment(images, padding, cfg.flip, generator)
            images = corrupt_batch(images, cfg.corruption_p, generator, cfg.corruption_kinds)
            logits = forward(images)
            loss = loss_fn(logits, labels)
            if labels_of is not None and cfg.distill_weight > 0:
                t = cfg.distill_temperature
                student = functional.log_softmax(logits / t, 1)
                kl = functional.kl_div(student, teacher[rows], log_target=True, reduction="batchmean")
                loss = (1.0 - cfg.distill_weight) * loss + cfg.distill_weight * t * t * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n = labels.shape[0]
            total_loss += float(loss.detach()) * n
            correct += int((logits.detach().argmax(1) == labels).sum())
            seen += n
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
        stats = {"loss": total_loss / seen, "accuracy": correct / seen}
        logger.info(
            "%s epoch %d/%d loss %.4f acc %.4f", name, epoch + 1, cfg.epochs, stats["loss"], stats["accuracy"]
        )
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _peek_shape(split: Split) -> Tuple[int, int, int, int]:
    if isinstance(split, TensorSplit):
        return tuple(split.images.shape)  # type: ignore[return-value]
    image, _ = split.dataset[0]
    return (len(split), *image.shape)  # type: ignore[return-value]


@torch.no_grad()
def collect(
    fn: Callable[[torch.Tensor], Tuple[torch.Tensor, ...]],
    split: Split,
    device: torch.device,
    batch_size: int = 512,
) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Run `fn` (already in eval mode) over a split; each output concatenated on CPU, and the labels."""
    outs: List[List[torch.Tensor]] = []
    labels_all = []
    for images, labels in split.batches(batch_size):
        res = fn(images.to(device))
        if not outs:
            outs = [[] for _ in res]
        for acc, r in zip(outs, res):
            acc.append(r.float().cpu())
        labels_all.append(labels.cpu())
    return [torch.cat(o) for o in outs], torch.cat(labels_all)
