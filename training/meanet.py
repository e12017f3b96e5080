"""MEANet blocks (Long et al., ICDCS 2021): main block, adaptive block, extension block, and the cloud model.

All modules take raw uint8 NCHW images: normalisation is the first layer, so it is inside every ONNX graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from training.backbones import build_backbone, conv_bn, make_stage


class Normalize(nn.Module):
    """uint8 (or 0..255 float) pixels -> (x - mean) / std, per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.inv_std: torch.Tensor
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) - self.mean) * self.inv_std


@dataclass
class Architecture:
    """Everything needed to rebuild the three torch modules (stored in checkpoints and in the card)."""

    backbone: str
    in_channels: int
    num_classes: int
    hard_classes: List[int]
    mean: List[float]
    std: List[float]
    main_size: str = "main"
    cloud_size: str = "cloud"
    main_overrides: Dict[str, Any] = field(default_factory=dict)
    cloud_overrides: Dict[str, Any] = field(default_factory=dict)
    adaptive_channels: Tuple[int, int] = (32, 64)
    adaptive_blocks: int = 0  # BasicBlocks after each downsampling conv of the adaptive block
    extension_width: int = 96
    extension_blocks: int = 2

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["adaptive_channels"] = list(self.adaptive_channels)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> Architecture:
        d = dict(d)
        d["adaptive_channels"] = tuple(d["adaptive_channels"])
        for key in ("main_overrides", "cloud_overrides"):
            d[key] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.get(key, {}).items()}
        return cls(**d)


class MainBlock(nn.Module):
    """The edge's first block: image -> (logits over all classes, last-stage feature map)."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.norm = Normalize(arch.mean, arch.std)
        self.backbone = build_backbone(
            arch.backbone, arch.in_channels, arch.num_classes, arch.main_size, arch.main_overrides
        )
        self.feature_channels = int(self.backbone.feature_channels)  # type: ignore[arg-type]
        self.total_stride = int(self.backbone.total_stride)  # type: ignore[arg-type]

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.backbone(self.norm(image))


class AdaptiveBlock(nn.Module):
    """A small CNN over the raw input whose output map has the main block's feature-map size."""

    def __init__(
        self, in_channels: int, channels: Tuple[int, int], total_stride: int, blocks: int = 0
    ) -> None:
        super().__init__()
        c0, c1 = channels
        layers: List[nn.Module] = [conv_bn(in_channels, c0)]
        ch = c0
        for _ in range(max(int(total_stride).bit_length() - 1, 0)):  # log2(total_stride) stride-2 convs
            layers.append(conv_bn(ch, c1, stride=2))
            ch = c1
            if blocks:
                stage, ch = make_stage(ch, c1, blocks, 1)
                layers.append(stage)
        if ch != c1:
            layers.append(conv_bn(ch, c1))
        self.layers = nn.Sequential(*layers)
        self.out_channels = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ExtensionBlock(nn.Module):
    """(image, main features) -> logits over the hard classes.

    The main features are detached: training the extension never changes the main block.
    """

    def __init__(self, arch: Architecture, feature_channels: int, total_stride: int) -> None:
        super().__init__()
        self.norm = Normalize(arch.mean, arch.std)
        self.adaptive = AdaptiveBlock(
            arch.in_channels, arch.adaptive_channels, total_stride, arch.adaptive_blocks
        )
        self.body, ch = make_stage(
            feature_channels + self.adaptive.out_channels, arch.extension_width, arch.extension_blocks, 1
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, len(arch.hard_classes))

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        adaptive = self.adaptive(self.norm(image))
        x = torch.cat([features.detach(), adaptive], dim=1)
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


class CloudNet(nn.Module):
    """The cloud model: a larger backbone on all classes, image -> logits."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.norm = Normalize(arch.mean, arch.std)
        self.backbone = build_backbone(
            arch.backbone, arch.in_channels, arch.num_classes, arch.cloud_size, arch.cloud_overrides
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits, _ = self.backbone(self.norm(image))
        return logits


def build_models(
    arch: Architecture, input_shape: Optional[Sequence[int]] = None
) -> Tuple[MainBlock, ExtensionBlock, CloudNet]:
    """The three modules for an architecture; with `input_shape` also checks that the maps line up."""
    main = MainBlock(arch)
    ext = ExtensionBlock(arch, main.feature_channels, main.total_stride)
    cloud = CloudNet(arch)
    if input_shape is not None:
        probe = torch.zeros(1, *input_shape, dtype=torch.uint8)
        main.eval()
        ext.eval()
        with torch.no_grad():
            _, feats = main(probe)
            adaptive = ext.adaptive(ext.norm(probe))
        if feats.shape[-2:] != adaptive.shape[-2:]:
            raise ValueError(
                f"adaptive map {tuple(adaptive.shape)} does not match main features {tuple(feats.shape)}"
            )
    return main, ext, cloud
