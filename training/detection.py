"""Training of the two video detectors on generated train sequences (torch; CPU or CUDA).

`python -m training.detection train ...` trains one or both detectors and leaves checkpoints; `... publish`
exports them to ONNX, evaluates them on the test sequences through the device's own decoder and writes the
model card (training/detection_publish.py). The two steps are apart so a run on a GPU box can be published on
any machine.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from training.detection_models import build, detection_loss, make_targets, normalise
from video.dataset import load_split

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    kind: str
    steps: int
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    seed: int = 0
    device: str = "cpu"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("edge", "cloud"):
            raise ValueError(f"kind is edge or cloud, got {self.kind!r}")
        if self.steps < 1 or self.batch < 1:
            raise ValueError("steps and batch must be >= 1")


class FrameBank:
    """Every frame of a split in memory with its boxes (x1,y1,x2,y2 pixels) and labels (0..9)."""

    def __init__(self, root: Path, limit_sequences: Optional[int] = None) -> None:
        split = load_split(root)
        n = split.sequences if limit_sequences is None else min(limit_sequences, split.sequences)
        self.frames = np.concatenate([split.frames(s) for s in range(n)])
        by_image = split.annotations_by_image()
        self.boxes: List[np.ndarray] = []
        self.labels: List[np.ndarray] = []
        for s in range(n):
            for iid in split.image_ids(s):
                anns = by_image[iid]
                b = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
                b[:, 2:] += b[:, :2]
                self.boxes.append(b)
                self.labels.append(np.array([a["category_id"] - 1 for a in anns], dtype=np.int64))
        self.height, self.width = self.frames.shape[1:]
        logger.info("%s: %d frames, %d boxes", root, len(self.frames), sum(len(b) for b in self.boxes))

    def batch(
        self, rng: np.random.Generator, size: int
    ) -> Tuple[np.ndarray, List[np.ndarray], List[np.ndarray]]:
        """A random batch, each frame flipped left-right with probability 1/2."""
        idx = rng.integers(len(self.frames), size=size)
        flips = rng.uniform(size=size) < 0.5
        images = self.frames[idx].copy()
        boxes, labels = [], []
        for k, (i, flip) in enumerate(zip(idx, flips)):
            b = self.boxes[i].copy()
            if flip:
                images[k] = images[k][:, ::-1]
                b[:, [0, 2]] = self.width - b[:, [2, 0]]
            boxes.append(b)
            labels.append(self.labels[i])
        return images[:, None], boxes, labels


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(cfg: TrainConfig, bank: FrameBank, checkpoint: Path, log_every: int = 50) -> Dict[str, Any]:
    """Train one detector; writes `checkpoint` (state_dict + metadata) and returns the metadata."""
    torch.manual_seed(cfg.seed)
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    model = build(cfg.kind).to(device)
    stride = int(model.stride)  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    start = time.monotonic()
    running: Dict[str, float] = {}
    model.train()
    for step in range(cfg.steps):
        images, boxes, labels = bank.batch(rng, cfg.batch)
        targets = {
            k: v.to(device) for k, v in make_targets(boxes, labels, bank.height, bank.width, stride).items()
        }
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        heat, box = model(normalise(torch.from_numpy(images).to(device)))
        loss, parts = detection_loss(heat, box, targets, stride)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        for k, v in parts.items():
            running[k] = running.get(k, 0.0) + v
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            elapsed = time.monotonic() - start
            n = (step % log_every) + 1
            logger.info(
                "%s step %d/%d heat %.4f box %.4f lr %.2e %.3f s/step elapsed %.0f s",
                cfg.kind,
                step + 1,
                cfg.steps,
                running.get("heat", 0) / n,
                running.get("box", 0) / n,
                _lr_at(step, cfg),
                elapsed / (step + 1),
                elapsed,
            )
            running = {}
    wall_s = time.monotonic() - start
    meta = {"config": asdict(cfg), "wall_s": round(wall_s, 1), "s_per_step": round(wall_s / cfg.steps, 4)}
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.cpu().state_dict(), "meta": meta}, checkpoint)
    logger.info("%s: trained in %.0f s -> %s", cfg.kind, wall_s, checkpoint)
    return meta


def load_checkpoint(path: Path) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob["meta"]
    model = build(meta["config"]["kind"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), meta


def main(argv: Optional[List[str]] = None) -> int:
    from training.detection_cli import build_parser, run

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
