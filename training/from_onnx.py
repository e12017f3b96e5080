"""Rebuild a trained torch module from its exported ONNX graph, BatchNorm included.

Why: the committed cloud model exists only as `cloud.onnx` (its checkpoint was not kept), and fine-tuning or
test-time adaptation needs the torch module. The export folded every BatchNorm into the convolution before it
(y = W'x + b'), so the graph holds W' and b' but not the normalisation statistics. This module loads W' into
each convolution and gives the BatchNorm after it the statistics of W'x on clean images, with an affine part
that undoes the normalisation: BN(W'x) = (W'x - mu) / sigma * sigma + (mu + b') = W'x + b'. The function is
the exported one exactly, and the statistics are real ones, so adapting them to new data (`adapt.py`) or
training on it (`edgecascade train --init-from`) behaves as on a module trained with BatchNorm from the start.
`load_folded` checks the result against onnxruntime on the first clean batch and refuses a mismatch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn


def conv_bn_pairs(module: nn.Module) -> List[Tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Each convolution with the BatchNorm that follows it in definition order (conv_bn, BasicBlock's
    conv1/bn1 and conv2/bn2, a downsample's conv/bn: every convolution of these backbones has one)."""
    pairs: List[Tuple[nn.Conv2d, nn.BatchNorm2d]] = []
    pending = None
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if pending is not None:
                raise ValueError("a convolution without a BatchNorm after it: not a folded conv+BN backbone")
            pending = m
        elif isinstance(m, nn.BatchNorm2d) and pending is not None:
            pairs.append((pending, m))
            pending = None
    if pending is not None:
        raise ValueError("the last convolution has no BatchNorm after it")
    return pairs


def _execution_order(module: nn.Module, probe: torch.Tensor) -> List[nn.Conv2d]:
    """Convolutions in the order a forward pass runs them: the order of the exported graph's Conv nodes."""
    order: List[nn.Conv2d] = []
    hooks = [
        m.register_forward_hook(lambda m, _i, _o: order.append(m))
        for m in module.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            module.eval()(probe)
    finally:
        for h in hooks:
            h.remove()
    return order


def load_folded(module: nn.Module, onnx_path: Path, clean_batches: Iterable[torch.Tensor]) -> nn.Module:
    """`module` (freshly built with the exported architecture) with the graph's weights and BatchNorm
    statistics measured on `clean_batches` (uint8 images the module takes). Returns `module`, in eval mode."""
    graph = onnx.load(str(onnx_path)).graph
    weights: Dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    pairs = dict(conv_bn_pairs(module))
    batches = iter(clean_batches)
    first = next(batches)
    order = _execution_order(module, first[:1])
    if len(order) != len(convs) or len(pairs) != len(order):
        raise ValueError(f"{onnx_path}: {len(convs)} Conv nodes, the module runs {len(order)} convolutions")
    biases: Dict[nn.Conv2d, torch.Tensor] = {}
    for conv, node in zip(order, convs):
        w = torch.from_numpy(weights[node.input[1]].copy())
        if tuple(w.shape) != tuple(conv.weight.shape):
            raise ValueError(
                f"{onnx_path}: {node.name} has weights {tuple(w.shape)}, the module wants "
                f"{tuple(conv.weight.shape)}"
            )
        conv.weight.data.copy_(w)
        biases[conv] = (
            torch.from_numpy(weights[node.input[2]].copy())
            if len(node.input) > 2
            else torch.zeros(w.shape[0])
        )
    # The rest (linear layers, normalisation buffers) keeps its name through the export.
    state = module.state_dict()
    for name, value in weights.items():
        if name in state and state[name].shape == value.shape:
            state[name].copy_(torch.from_numpy(value.copy()))
    fold_in(module, pairs, biases, [first, *batches])
    _check_against_onnx(module.eval(), onnx_path, first)
    return module


def fold_in(
    module: nn.Module,
    pairs: Dict[nn.Conv2d, nn.BatchNorm2d],
    biases: Dict[nn.Conv2d, torch.Tensor],
    clean_batches: Iterable[torch.Tensor],
) -> None:
    """Each convolution of `pairs` already holds its folded weights W'; give the BatchNorm after it the
    statistics of W'x on `clean_batches` and the affine part that makes the pair compute W'x + b' (its bias
    in `biases`)."""
    # First pass: every BN is "add the folded bias" (identity statistics), so the module computes the
    # exported function and each conv's output can be measured.
    for conv, bn in pairs.items():
        assert bn.running_mean is not None and bn.running_var is not None  # BatchNorm2d tracks them
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.data.fill_(1.0)
        bn.bias.data.copy_(biases[conv])
    sums = {conv: torch.zeros(conv.out_channels, dtype=torch.float64) for conv in pairs}
    squares = {conv: torch.zeros(conv.out_channels, dtype=torch.float64) for conv in pairs}
    counts = {conv: 0 for conv in pairs}

    def measure(conv: nn.Conv2d, _inputs: object, out: torch.Tensor) -> None:
        o = out.detach().double()
        sums[conv] += o.sum((0, 2, 3))
        squares[conv] += (o * o).sum((0, 2, 3))
        counts[conv] += o.shape[0] * o.shape[2] * o.shape[3]

    hooks = [conv.register_forward_hook(measure) for conv in pairs]  # type: ignore[arg-type]
    module.eval()
    with torch.no_grad():
        for batch in clean_batches:
            module(batch)
    for h in hooks:
        h.remove()
    for conv, bn in pairs.items():
        mean = sums[conv] / counts[conv]
        var = (squares[conv] / counts[conv] - mean * mean).clamp_min(1e-8)
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.copy_(mean.float())
        bn.running_var.copy_(var.float())
        bn.weight.data.copy_((var + bn.eps).sqrt().float())
        bn.bias.data.copy_((mean + biases[conv].double()).float())


def _check_against_onnx(
    module: nn.Module, onnx_path: Path, batch: torch.Tensor, tolerance: float = 1e-3
) -> None:
    """A weight the name-and-shape match above missed (one the exporter renamed) would keep its random value:
    compare with onnxruntime and refuse."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probe = batch[:64]
    expected = session.run(None, {session.get_inputs()[0].name: probe.numpy()})[0]
    with torch.no_grad():
        out = module(probe)
    got = (out[0] if isinstance(out, tuple) else out).numpy()
    diff = float(np.abs(got - expected).max())
    if not diff < tolerance:
        raise ValueError(
            f"{onnx_path}: the rebuilt module differs from the export by {diff:.3g} (> {tolerance})"
        )
