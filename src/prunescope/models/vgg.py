"""VGG-11 and VGG-16 with BatchNorm, CIFAR-style (Simonyan & Zisserman 2015, configs A and D).

Every 3x3 conv (padding 1, no bias) is followed by BatchNorm and ReLU; ``"M"`` is a 2x2 max pool.
After the five pools a global average pool feeds a single Linear(512, ``num_classes``), so any
image size ``S >= 32`` works (the pools floor ``S`` by 32; at 32 x 32 the last map is 1 x 1).

Shapes: input ``(N, C, S, S)`` (default 3 x 32 x 32), output logits ``(N, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunescope.models import init_weights, register

CONFIGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """``features`` from a config, global average pool, flatten, Linear(512, classes)."""

    def __init__(self, config: Sequence[int | str], num_classes: int, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [
                nn.Conv2d(channels, int(item), kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(int(item)), nn.ReLU(),
            ]
            channels = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


@register("vgg11", in_channels=3, image_size=32, min_image_size=32)
def vgg11(*, num_classes: int, in_channels: int, image_size: int) -> VGG:
    """VGG-11 (config A) with BatchNorm of Simonyan & Zisserman 2015; ``image_size`` >= 32."""
    return VGG(CONFIGS["A"], num_classes, in_channels)


@register("vgg16", in_channels=3, image_size=32, min_image_size=32)
def vgg16(*, num_classes: int, in_channels: int, image_size: int) -> VGG:
    """VGG-16 (config D) with BatchNorm of Simonyan & Zisserman 2015; ``image_size`` >= 32."""
    return VGG(CONFIGS["D"], num_classes, in_channels)
