"""CIFAR ResNet-20/32/56 of He et al. 2016 (Deep Residual Learning, Section 4.2).

A 3x3 conv with 16 channels, BatchNorm and ReLU, then three stages of ``n = (depth - 2) / 6``
basic blocks with 16, 32 and 64 channels (the second and third stage start with stride 2), a global
average pool and Linear(64, ``num_classes``).

Shortcuts are identities, except where a block changes the shape (the first block of stages 2 and
3), where the shortcut is a projection: 1x1 conv (stride 2, no bias) + BatchNorm. This is the
paper's **option B**; the paper's CIFAR numbers use option A (zero-padding identity), which has no
parameters, so option B adds 2 x (1x1 conv + BN) = 2,816 parameters (ResNet-20: 272,474 in all).

Shapes: input ``(N, C, S, S)`` (default 3 x 32 x 32), output logits ``(N, num_classes)``; the net
downsamples by 4, so ``S >= 4``.

:class:`BasicBlock` and :func:`make_stage` are shared with :mod:`.resnet_imagenet`; submodule names
(``conv1``, ``bn1``, ``layer1.0.downsample.0``, ``fc``, ...) follow torchvision's.
"""

from __future__ import annotations

import torch
from torch import nn

from prunescope.models import init_weights, register


def projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN shortcut when the shape changes (option B), else ``None`` (identity)."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """conv 3x3 (stride), BN, ReLU, conv 3x3, BN, add the shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample = projection(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + shortcut)


def make_stage(
    block: type[nn.Module], in_planes: int, planes: int, blocks: int, stride: int
) -> nn.Sequential:
    """``blocks`` blocks of ``block``; only the first one strides (and may project)."""
    layers = [block(in_planes, planes, stride)]
    layers += [block(planes * block.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """3x3 conv 16 stem, three stages of ``n`` basic blocks (16, 32, 64), average pool, Linear."""

    def __init__(self, n: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = make_stage(BasicBlock, 16, 16, n, stride=1)
        self.layer2 = make_stage(BasicBlock, 16, 32, n, stride=2)
        self.layer3 = make_stage(BasicBlock, 32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register("resnet20", in_channels=3, image_size=32, min_image_size=4)
def resnet20(*, num_classes: int, in_channels: int, image_size: int) -> CifarResNet:
    """ResNet-20 (n = 3) of He et al. 2016 for CIFAR, option-B projection shortcuts."""
    return CifarResNet(3, num_classes, in_channels)


@register("resnet32", in_channels=3, image_size=32, min_image_size=4)
def resnet32(*, num_classes: int, in_channels: int, image_size: int) -> CifarResNet:
    """ResNet-32 (n = 5) of He et al. 2016 for CIFAR, option-B projection shortcuts."""
    return CifarResNet(5, num_classes, in_channels)


@register("resnet56", in_channels=3, image_size=32, min_image_size=4)
def resnet56(*, num_classes: int, in_channels: int, image_size: int) -> CifarResNet:
    """ResNet-56 (n = 9) of He et al. 2016 for CIFAR, option-B projection shortcuts."""
    return CifarResNet(9, num_classes, in_channels)
