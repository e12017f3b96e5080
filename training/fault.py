"""The fault-detection models: three 1-D CNNs (sensor, gateway, cloud) on simulated vibration windows.

Input: int16 accelerometer counts [2, 2048] at 12 kHz (`vibration.dataset`); the scaling to g is inside the
graph, so the sensor sends the ADC's counts as they are. Output: logits over `vibration.simulate.CONDITIONS`.
Trained on CPU (one thread: the box is shared) on the train split's recordings, thresholds calibrated on the
validation split's (other recordings), figures on the test split's: `python -m training.fault --help`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vibration.dataset import CHANNELS, WINDOW, SplitSpec, Windows, make_windows
from vibration.simulate import CONDITIONS, COUNTS_PER_G

logger = logging.getLogger(__name__)

INPUT_SCALE = 1.0 / (COUNTS_PER_G * 0.5)  # counts -> units of 0.5 g: the simulated signals' typical level
OPSET = 17


@dataclass(frozen=True)
class Arch:
    """Conv layers as (out channels, kernel, stride); global average and max pooling; one linear layer."""

    layers: Tuple[Tuple[int, int, int], ...]


ARCHS: Dict[str, Arch] = {
    # ~0.4 M MACs, ~4 k parameters: a Cortex-M4F class microcontroller (see MODEL_CARD.md)
    "sensor": Arch(((8, 15, 4), (16, 9, 4), (16, 9, 2))),
    "gateway": Arch(((16, 31, 2), (32, 15, 2), (32, 9, 2), (64, 9, 2))),  # ~9.7 M MACs
    "cloud": Arch(((32, 31, 4), (48, 15, 2), (64, 9, 2), (96, 9, 2), (128, 9, 1))),  # ~21 M MACs
}


class FaultNet(nn.Module):
    def __init__(self, arch: Arch, channels: int = CHANNELS, classes: int = len(CONDITIONS)) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        width = channels
        for out, kernel, stride in arch.layers:
            layers += [nn.Conv1d(width, out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm1d(out)]
            layers.append(nn.ReLU())
            width = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        x = self.body(window.float() * INPUT_SCALE)
        # max pooling keeps a few strong impacts, mean pooling their rate
        return self.head(torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1))


def macs_of(model: nn.Module) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, CHANNELS, WINDOW, dtype=torch.int16))
    return int(counter.get_total_flops() // 2)


def peak_activation_bytes(model: FaultNet) -> int:
    """The largest input + output pair of one layer (float32): the RAM a layer-by-layer runtime needs."""
    sizes = [CHANNELS * WINDOW * 2]  # the int16 window itself
    x = torch.zeros(1, CHANNELS, WINDOW, dtype=torch.int16).float()
    peak = 0
    for layer in model.body:
        y = layer(x)
        if isinstance(layer, nn.Conv1d):
            peak = max(peak, 4 * (x.numel() + y.numel()))
        x = y
    return max(peak, sizes[0])


def train_one(
    kind: str, train: Windows, epochs: int, seed: int, batch: int = 64, lr: float = 3e-3
) -> Tuple[FaultNet, Dict[str, float]]:
    torch.manual_seed(seed)
    model = FaultNet(ARCHS[kind])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    x = torch.from_numpy(train.x)
    y = torch.from_numpy(train.y)
    gen = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    loss_sum = correct = seen = 0.0
    for _epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        loss_sum = correct = seen = 0.0
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            xb = x[idx]
            # augmentation: a random sign per axis (mounting) and a random circular shift (window phase)
            xb = xb * (torch.randint(0, 2, (len(idx), CHANNELS, 1), generator=gen) * 2 - 1).to(xb.dtype)
            xb = torch.roll(xb, int(torch.randint(0, WINDOW, (1,), generator=gen)), dims=2)
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += float((logits.argmax(1) == y[idx]).sum())
            seen += len(idx)
        logger.info("%s epoch %d loss %.4f acc %.4f", kind, _epoch + 1, loss_sum / seen, correct / seen)
    model.eval()
    return model, {
        "epochs": epochs,
        "seconds": round(time.monotonic() - started, 1),
        "train_loss": round(loss_sum / seen, 5),
        "train_accuracy": round(correct / seen, 5),
    }


def probabilities(model: nn.Module, windows: Windows) -> np.ndarray:
    with torch.no_grad():
        out = [
            torch.softmax(model(torch.from_numpy(windows.x[i : i + 256])), 1)
            for i in range(0, len(windows), 256)
        ]
    return torch.cat(out).numpy()


def export(model: nn.Module, path: Path) -> float:
    """Batch-dynamic ONNX, input `window` (int16), output `logits`; the max abs difference vs torch."""
    import onnxruntime as ort

    example = torch.from_numpy(make_probe())
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["window"],
        output_names=["logits"],
        dynamic_axes={"window": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"window": example.numpy()})
    with torch.no_grad():
        want = model(example).numpy()
    return float(np.abs(got - want).max())


def make_probe() -> np.ndarray:
    return np.random.default_rng(0).integers(-3000, 3000, size=(3, CHANNELS, WINDOW)).astype(np.int16)


def splits(recordings: Sequence[int], duration_s: float, train_hop: int = WINDOW // 2) -> Dict[str, Windows]:
    train_rec, val_rec, test_rec = recordings
    return {
        "train": make_windows(SplitSpec("train", train_rec, duration_s, hop=train_hop)),
        "validation": make_windows(SplitSpec("validation", val_rec, duration_s)),
        "test": make_windows(SplitSpec("test", test_rec, duration_s)),
    }


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.fault",
        description="Train the sensor, gateway and cloud fault models on simulated recordings; write ONNX, "
        "the probabilities of the validation and test windows and the training figures to --out.",
        epilog="example: nice -n 10 python -m training.fault --out build/fault --epochs 30,15,12",
    )
    parser.add_argument("--out", type=Path, default=Path("build/fault"))
    parser.add_argument("--recordings", default="120,40,40", help="per fault and severity: train,val,test")
    parser.add_argument("--duration-s", type=float, default=0.6, help="length of each recording")
    parser.add_argument("--epochs", default="12,12,12", help="sensor,gateway,cloud")
    parser.add_argument("--kinds", default="sensor,gateway,cloud")
    parser.add_argument("--train-hop", type=int, default=WINDOW // 2, help="samples between train windows")
    parser.add_argument("--batch", default="64,32,32", help="batch size: sensor,gateway,cloud")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(list(argv) or None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    recs = [int(v) for v in args.recordings.split(",")]
    data = splits(recs, args.duration_s, args.train_hop)
    logger.info("windows: %s", {k: len(v) for k, v in data.items()})
    epochs = dict(zip(("sensor", "gateway", "cloud"), (int(e) for e in args.epochs.split(","))))
    batches = dict(zip(("sensor", "gateway", "cloud"), (int(b) for b in args.batch.split(","))))
    for kind in args.kinds.split(","):
        model, figures = train_one(kind, data["train"], epochs[kind], args.seed, batch=batches[kind])
        figures.update(batch=batches[kind], train_hop=args.train_hop, train_windows=len(data["train"]))
        figures.update(
            macs=macs_of(model),
            params=sum(p.numel() for p in model.parameters()),
            peak_activation_bytes=peak_activation_bytes(model),
            max_abs_diff_vs_torch=export(model, args.out / f"{kind}.onnx"),
        )
        for split in ("validation", "test"):
            probs = probabilities(model, data[split])
            np.save(args.out / f"{kind}.{split}.probs.npy", probs)
            figures[f"{split}_accuracy"] = round(float((probs.argmax(1) == data[split].y).mean()), 5)
        (args.out / f"{kind}.json").write_text(json.dumps(figures, indent=1))
        logger.info("%s: %s", kind, figures)
    for split in ("validation", "test"):
        np.save(args.out / f"{split}.labels.npy", data[split].y)
        np.save(args.out / f"{split}.severity.npy", data[split].severity)
        np.save(args.out / f"{split}.recording.npy", data[split].recording)  # for the shares' spread
    (args.out / "recipe.json").write_text(json.dumps(vars(args), default=str, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
