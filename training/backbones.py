"""Backbones for small inputs: CIFAR-style ResNet (torchvision's BasicBlock) and torchvision's MobileNetV2.

Each backbone maps a normalised float image to (logits, last-stage feature map) so the MEANet extension
block can read the features; `feature_channels` and `total_stride` describe that map.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.resnet import BasicBlock

BACKBONES = ("resnet", "mobilenetv2")


def conv_bn(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def make_stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> Tuple[nn.Sequential, int]:
    """`blocks` torchvision BasicBlocks; the first projects with a 1x1 conv where shape changes."""
    layers: List[nn.Module] = []
    for i in range(blocks):
        s = stride if i == 0 else 1
        downsample = None
        if s != 1 or in_ch != out_ch:
            downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=s, bias=False), nn.BatchNorm2d(out_ch)
            )
        layers.append(BasicBlock(in_ch, out_ch, stride=s, downsample=downsample))
        in_ch = out_ch
    return nn.Sequential(*layers), in_ch


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 3x3 stem, stages of BasicBlocks at `widths`, the first at stride 1."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, widths[0])
        stages = []
        ch = widths[0]
        for i, w in enumerate(widths):
            stage, ch = make_stage(ch, w, blocks_per_stage, 1 if i == 0 else 2)
            stages.append(stage)
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(ch, num_classes)
        self.feature_channels = ch
        self.total_stride = 2 ** (len(widths) - 1)
        _init(self)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.stages(self.stem(x))
        logits = self.fc(self.dropout(torch.flatten(self.pool(features), 1)))
        return logits, features


class SmallMobileNetV2(nn.Module):
    """torchvision MobileNetV2 adapted to small inputs: stride-1 stem on any channel count, total stride 4.

    The ImageNet setting downsamples 32x, which leaves nothing of a 28x28 image; here two stages downsample.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width_mult: float = 0.5,
        last_channels: Optional[int] = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        # t, c, n, s as in torchvision, with strides 1,1,2,2,1,1,1 (ImageNet: 1,2,2,2,1,2,1)
        setting = [
            [1, 16, 1, 1],
            [6, 24, 2, 1],
            [6, 32, 3, 2],
            [6, 64, 4, 2],
            [6, 96, 3, 1],
            [6, 160, 3, 1],
            [6, 320, 1, 1],
        ]
        net = mobilenet_v2(
            num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=setting, dropout=dropout
        )
        stem = net.features[0][0]
        assert isinstance(stem, nn.Conv2d)
        net.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
        self.features = net.features
        self.classifier = net.classifier
        last = net.last_channel
        if last_channels is not None and last_channels != last:
            # the 1x1 expansion to 1280*w channels dominates the cost on tiny maps; allow a narrower one
            prev = self.features[-1][0]
            assert isinstance(prev, nn.Conv2d)
            self.features[-1] = nn.Sequential(
                nn.Conv2d(prev.in_channels, last_channels, 1, bias=False),
                nn.BatchNorm2d(last_channels),
                nn.ReLU6(inplace=True),
            )
            self.classifier[-1] = nn.Linear(last_channels, num_classes)
            last = last_channels
        self.feature_channels = last
        self.total_stride = 4
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        logits = self.classifier(torch.flatten(self.pool(features), 1))
        return logits, features


def build_backbone(
    name: str, in_channels: int, num_classes: int, size: str, overrides: Optional[dict] = None
) -> nn.Module:
    """A backbone by family and size preset ("main", "cloud", "tiny"); `overrides` replaces preset keys."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    cfg: Dict[str, Any] = dict(PRESETS[name][size])
    cfg.update(overrides or {})
    if name == "resnet":
        return CifarResNet(in_channels, num_classes, **cfg)
    return SmallMobileNetV2(in_channels, num_classes, **cfg)


# Size presets. "main" is edge-sized (a ResNet-8, ~44k parameters), "cloud" cloud-sized (a ResNet-20 at twice
# the usual width, ~1.1M parameters: on Fashion-MNIST it beat the 48/96/192 one, which costs 2.2x per epoch,
# by training 15 instead of 12 epochs);
# "tiny" is for --quick runs and tests.
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "resnet": {
        "main": {"widths": (12, 24, 48), "blocks_per_stage": 1},
        "cloud": {"widths": (32, 64, 128), "blocks_per_stage": 3},
        "tiny": {"widths": (8, 16, 32), "blocks_per_stage": 1},
        "tiny-cloud": {"widths": (16, 32, 64), "blocks_per_stage": 1},
    },
    "mobilenetv2": {
        "main": {"width_mult": 0.35, "last_channels": 128},
        "cloud": {"width_mult": 1.0, "last_channels": 1280},
        "tiny": {"width_mult": 0.25, "last_channels": 64},
        "tiny-cloud": {"width_mult": 0.35, "last_channels": 128},
    },
}


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    # zero-init the last BN of each residual branch: each block starts as identity, which trains faster
    for m in module.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
