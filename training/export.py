"""ONNX export of the three blocks (uint8 image in, normalisation inside), torch checks, cost counts."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

logger = logging.getLogger(__name__)

OPSET = 17
MAX_ABS_DIFF = 1e-4


class ExportError(RuntimeError):
    """An exported graph disagrees with its torch module."""


class _MainWrapper(nn.Module):
    def __init__(self, main: nn.Module) -> None:
        super().__init__()
        self.main = main

    def forward(self, image: torch.Tensor):  # type: ignore[no-untyped-def]
        logits, features = self.main(image)
        return logits, features


def export_block(
    module: nn.Module,
    kind: str,
    example_image: torch.Tensor,
    path: Path,
    example_features: torch.Tensor | None = None,
) -> Path:
    """Write one block (`main`, `extension` or `cloud`), batch-dynamic, with the I/O names the device reads:
    input `image` (uint8), and `features` for the extension; outputs `logits`, and `features` for the main."""
    module = module.eval().cpu()
    batch = {0: "batch"}
    if kind == "main":
        args: tuple = (example_image,)
        inputs, outputs = ["image"], ["logits", "features"]
        axes = {"image": batch, "logits": batch, "features": batch}
        module = _MainWrapper(module)
    elif kind == "extension":
        if example_features is None:
            raise ValueError("extension export needs example features")
        args = (example_image, example_features)
        inputs, outputs = ["image", "features"], ["logits"]
        axes = {"image": batch, "features": batch, "logits": batch}
    elif kind == "cloud":
        args = (example_image,)
        inputs, outputs = ["image"], ["logits"]
        axes = {"image": batch, "logits": batch}
    else:
        raise ValueError(f"unknown block kind {kind!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript (not installed)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    return path


def check_against_torch(
    module: nn.Module, kind: str, path: Path, images: torch.Tensor, features: torch.Tensor | None = None
) -> float:
    """Max abs difference between onnxruntime and torch outputs on a batch; raises ExportError above 1e-4."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    module = module.eval().cpu()
    feed: Dict[str, np.ndarray] = {"image": images.numpy()}
    with torch.no_grad():
        if kind == "extension":
            assert features is not None
            feed["features"] = features.numpy()
            ref: List[torch.Tensor] = [module(images, features)]
        elif kind == "main":
            ref = list(module(images))
        else:
            ref = [module(images)]
    got = sess.run(None, feed)
    diff = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref))
    if not diff <= MAX_ABS_DIFF:
        raise ExportError(f"{path.name}: onnxruntime differs from torch by {diff:.3g} (> {MAX_ABS_DIFF})")
    logger.info("%s: onnxruntime vs torch max abs diff %.3g", path.name, diff)
    return diff


def count_costs(module: nn.Module, inputs: Sequence[torch.Tensor]) -> Dict[str, int]:
    """MACs (FlopCounterMode FLOPs / 2), parameters and bytes moved (params + activations, fp32) per image."""
    module = module.eval().cpu()
    one = [t[:1] for t in inputs]
    activations = [0]

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                activations[0] += t.numel()

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            module(*one)
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in module.parameters())
    input_elems = sum(t.numel() for t in one)
    return {
        "macs": int(counter.get_total_flops() // 2),
        "params": int(params),
        "bytes_moved": int(params * 4 + (activations[0] + input_elems) * 4),
    }
