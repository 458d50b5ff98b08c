"""LeNet-300-100 (fully connected) and LeNet-5 (convolutional), MNIST-sized by default.

Shapes: input ``(N, C, S, S)`` with ``C = in_channels`` and ``S = image_size`` (default
1 x 28 x 28), output logits ``(N, num_classes)``.
"""

from __future__ import annotations

import torch
from torch import nn

from prunescope.models import init_weights, register


class LeNet300(nn.Module):
    """Flatten, then Linear 300, ReLU, Linear 100, ReLU, Linear ``num_classes``."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * image_size * image_size, 300), nn.ReLU(),
            nn.Linear(300, 100), nn.ReLU(),
            nn.Linear(100, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(x))


class LeNet5(nn.Module):
    """Conv 6@5x5 (padding 2), ReLU, pool 2, conv 16@5x5, ReLU, pool 2, FC 120-84-classes.

    The first conv pads by 2 at every image size, so a 28 x 28 digit follows the classic 32 x 32
    layout (16 x 5 x 5 = 400 features into the first Linear); other sizes are computed the same way
    (``S -> S // 2 -> S // 2 - 4 -> (S // 2 - 4) // 2``), which needs ``S >= 12``.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = (image_size // 2 - 4) // 2
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


@register("lenet300", in_channels=1, image_size=28, min_image_size=1)
def lenet300(*, num_classes: int, in_channels: int, image_size: int) -> LeNet300:
    """LeNet-300-100 of LeCun et al. 1998, the pruning benchmark of Han et al. 2015.

    On MNIST (1 x 28 x 28, 10 classes) it has 266,200 weights and 410 biases.
    """
    return LeNet300(num_classes, in_channels, image_size)


@register("lenet5", in_channels=1, image_size=28, min_image_size=12)
def lenet5(*, num_classes: int, in_channels: int, image_size: int) -> LeNet5:
    """LeNet-5 of LeCun et al. 1998 with ReLU and max pooling (as in Han et al. 2015)."""
    return LeNet5(num_classes, in_channels, image_size)
