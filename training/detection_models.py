"""The two video detectors (edge, cloud), their CenterNet/TTFNet-style targets and losses.

Anchor-free, single stride: a class heatmap (one peak per object centre) and, per cell, the distances from the
cell centre to the box's four sides. The edge model is a plain 4-conv CNN at stride 8 (16x16 cells on a
128x128 frame, ~15 M MACs); the cloud model is a small ResNet-ish encoder with a top-down FPN to stride 4
(~24x the MACs), so it sees small items the edge model misses. Inside the exported graph: uint8 input,
normalisation, sigmoid, the 3x3 max-pool peak test and the box decoding, so the device's numpy decoder only
thresholds, picks the top-k and runs NMS.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation, generalized_box_iou_loss

NUM_CLASSES = 10
PIXEL_MEAN = 100.0  # roughly the synthetic frames' grey level; exact values do not matter with BatchNorm
PIXEL_STD = 50.0
HEAT_PRIOR = 0.05


def _conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Module:
    return Conv2dNormActivation(cin, cout, kernel_size=k, stride=stride, activation_layer=nn.ReLU)


class _Head(nn.Module):
    """Heatmap logits (C) and side distances (4, in strides) from one feature map."""

    def __init__(self, cin: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.body = _conv(cin, width)
        self.heat = nn.Conv2d(width, num_classes, 1)
        self.box = nn.Conv2d(width, 4, 1)
        nn.init.constant_(self.heat.bias, -math.log((1 - HEAT_PRIOR) / HEAT_PRIOR))  # type: ignore[arg-type]
        nn.init.constant_(self.box.bias, 1.0)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        y = self.body(x)
        return self.heat(y), self.box(y)


class EdgeDetector(nn.Module):
    stride = 8

    def __init__(self, widths: Sequence[int] = (16, 24, 32, 48), num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        w = list(widths)
        self.body = nn.Sequential(
            _conv(1, w[0], 2), _conv(w[0], w[1], 2), _conv(w[1], w[2], 2), _conv(w[2], w[3])
        )
        self.head = _Head(w[3], w[3], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(x))


class _Stage(nn.Module):
    """Strided conv then a residual 3x3 pair."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.down = _conv(cin, cout, 2)
        self.res = nn.Sequential(
            _conv(cout, cout), Conv2dNormActivation(cout, cout, 3, activation_layer=None)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return F.relu(x + self.res(x))


class CloudDetector(nn.Module):
    stride = 4

    def __init__(
        self, widths: Sequence[int] = (32, 64, 96, 128), fpn: int = 64, num_classes: int = NUM_CLASSES
    ):
        super().__init__()
        w = list(widths)
        self.stem = _conv(1, 16)
        self.s2 = _Stage(16, w[0])  # stride 2
        self.s4 = _Stage(w[0], w[1])
        self.s8 = _Stage(w[1], w[2])
        self.s16 = _Stage(w[2], w[3])
        self.lat4 = nn.Conv2d(w[1], fpn, 1)
        self.lat8 = nn.Conv2d(w[2], fpn, 1)
        self.lat16 = nn.Conv2d(w[3], fpn, 1)
        self.smooth = _conv(fpn, fpn)
        self.head = _Head(fpn, fpn, num_classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        c4 = self.s4(self.s2(self.stem(x)))
        c8 = self.s8(c4)
        c16 = self.s16(c8)
        p8 = self.lat8(c8) + F.interpolate(self.lat16(c16), scale_factor=2.0, mode="nearest")
        p4 = self.lat4(c4) + F.interpolate(p8, scale_factor=2.0, mode="nearest")
        return self.head(self.smooth(p4))


def build(kind: str) -> nn.Module:
    if kind == "edge":
        return EdgeDetector()
    if kind == "cloud":
        return CloudDetector()
    raise ValueError(f"detector kind is edge or cloud, got {kind!r}")


def normalise(image_u8: torch.Tensor) -> torch.Tensor:
    return (image_u8.float() - PIXEL_MEAN) / PIXEL_STD


def decode_boxes(box_raw: torch.Tensor, stride: int) -> torch.Tensor:
    """[B,4,H,W] raw side distances -> [B,4,H,W] boxes x1,y1,x2,y2 in input pixels."""
    _, _, h, w = box_raw.shape
    ys = (torch.arange(h, dtype=box_raw.dtype, device=box_raw.device) + 0.5) * stride
    xs = (torch.arange(w, dtype=box_raw.dtype, device=box_raw.device) + 0.5) * stride
    cy = ys.view(1, h, 1).expand(1, h, w)
    cx = xs.view(1, 1, w).expand(1, h, w)
    d = F.softplus(box_raw) * stride
    return torch.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], dim=1)


class ExportWrapper(nn.Module):
    """uint8 [B,1,H,W] -> peaks [B,C,h,w] (sigmoid score at 3x3 local maxima, else 0), boxes [B,4,h,w]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.stride = int(model.stride)  # type: ignore[arg-type]

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        heat_logits, box_raw = self.model(normalise(image))
        heat = torch.sigmoid(heat_logits)
        peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).to(heat.dtype)
        return peaks, decode_boxes(box_raw, self.stride)


# -- targets and loss ------------------------------------------------------------------------------------
GAUSS_ALPHA = 0.54  # TTFNet's ratio of the Gaussian's extent to the box
REG_MIN_WEIGHT = 0.3  # cells where the object's Gaussian is at least this regress its box


def make_targets(
    boxes_per_image: List[np.ndarray],
    labels_per_image: List[np.ndarray],
    height: int,
    width: int,
    stride: int,
) -> Dict[str, torch.Tensor]:
    """Heatmaps [B,C,h,w], regression boxes [B,4,h,w] and weights [B,h,w] (numpy, one pass per object)."""
    h, w = height // stride, width // stride
    b = len(boxes_per_image)
    heat = np.zeros((b, NUM_CLASSES, h, w), dtype=np.float32)
    reg = np.zeros((b, 4, h, w), dtype=np.float32)
    weight = np.zeros((b, h, w), dtype=np.float32)
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    for i, (boxes, labels) in enumerate(zip(boxes_per_image, labels_per_image)):
        # larger boxes first, so a small object's cells win where their Gaussians overlap
        order: np.ndarray = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        for j in order:
            x1, y1, x2, y2 = boxes[j]
            cx, cy = (x1 + x2) / 2 / stride - 0.5, (y1 + y2) / 2 / stride - 0.5
            sx = max(GAUSS_ALPHA * (x2 - x1) / 6 / stride, 0.4)
            sy = max(GAUSS_ALPHA * (y2 - y1) / 6 / stride, 0.4)
            g = np.exp(-((xs - cx) ** 2) / (2 * sx * sx) - ((ys - cy) ** 2) / (2 * sy * sy))
            pi, pj = int(np.clip(round(cy), 0, h - 1)), int(np.clip(round(cx), 0, w - 1))
            g[pi, pj] = 1.0
            c = int(labels[j])
            np.maximum(heat[i, c], g, out=heat[i, c])
            cells = g >= REG_MIN_WEIGHT
            weight[i][cells] = g[cells]
            reg[i, :, cells] = boxes[j]
    return {"heat": torch.from_numpy(heat), "reg": torch.from_numpy(reg), "weight": torch.from_numpy(weight)}


def focal_heat_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (torchvision's sigmoid_focal_loss has no Gaussian targets)."""
    pos = target.eq(1.0).float()
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos_loss = -((1 - p) ** 2) * log_p * pos
    neg_loss = -((1 - target) ** 4) * (p**2) * log_not_p * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def detection_loss(
    heat_logits: torch.Tensor, box_raw: torch.Tensor, targets: Dict[str, torch.Tensor], stride: int
) -> Tuple[torch.Tensor, Dict[str, float]]:
    heat_loss = focal_heat_loss(heat_logits, targets["heat"])
    weight = targets["weight"]
    mask = weight > 0
    if mask.any():
        pred = decode_boxes(box_raw, stride).permute(0, 2, 3, 1)[mask]
        gt = targets["reg"].permute(0, 2, 3, 1)[mask]
        wts = weight[mask]
        box_loss = (generalized_box_iou_loss(pred, gt, reduction="none") * wts).sum() / wts.sum()
    else:
        box_loss = box_raw.sum() * 0.0
    total = heat_loss + 5.0 * box_loss
    return total, {"heat": float(heat_loss.detach()), "box": float(box_loss.detach())}
