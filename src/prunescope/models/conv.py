"""Conv-2, Conv-4 and Conv-6 of Frankle & Carbin 2019 (The Lottery Ticket Hypothesis, Figure 2).

Each is a VGG-like stack of blocks ``[conv 3x3, ReLU, conv 3x3, ReLU, max pool 2]`` with widths
64 / 64-128 / 64-128-256, then Linear 256, ReLU, Linear 256, ReLU, Linear ``num_classes``. Convs
pad by 1 ("same") and keep their biases (there is no BatchNorm).

Shapes: input ``(N, C, S, S)`` (default 3 x 32 x 32, CIFAR-10), output logits ``(N, num_classes)``.
A Conv-k with ``b`` blocks needs ``S >= 2 ** b``; the first Linear sees ``width * (S // 2**b) ** 2``
features (Conv-2 on CIFAR: 64 x 16 x 16 = 16,384).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunescope.models import init_weights, register


class ConvNet(nn.Module):
    """One block of two 3x3 convs and a max pool per entry of ``widths``, then FC 256-256."""

    def __init__(
        self, widths: Sequence[int], num_classes: int, in_channels: int, image_size: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(),
                nn.Conv2d(width, width, kernel_size=3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(widths)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(channels * side * side, 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


@register("conv2", in_channels=3, image_size=32, min_image_size=2)
def conv2(*, num_classes: int, in_channels: int, image_size: int) -> ConvNet:
    """Conv-2 of Frankle & Carbin 2019: [64, 64, pool], FC 256, 256, classes (4.3M weights)."""
    return ConvNet((64,), num_classes, in_channels, image_size)


@register("conv4", in_channels=3, image_size=32, min_image_size=4)
def conv4(*, num_classes: int, in_channels: int, image_size: int) -> ConvNet:
    """Conv-4 of Frankle & Carbin 2019: [64, 64, pool, 128, 128, pool], FC 256, 256, classes."""
    return ConvNet((64, 128), num_classes, in_channels, image_size)


@register("conv6", in_channels=3, image_size=32, min_image_size=8)
def conv6(*, num_classes: int, in_channels: int, image_size: int) -> ConvNet:
    """Conv-6 of Frankle & Carbin 2019: Conv-4 plus [256, 256, pool], FC 256, 256, classes."""
    return ConvNet((64, 128, 256), num_classes, in_channels, image_size)
