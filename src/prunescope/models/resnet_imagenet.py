"""ImageNet ResNet-18 and ResNet-50 of He et al. 2016 (Deep Residual Learning, Table 1).

Stem: 7x7 conv 64 (stride 2, padding 3, no bias), BatchNorm, ReLU, 3x3 max pool (stride 2,
padding 1); then four stages with 64, 128, 256, 512 planes (stages 2-4 start with stride 2), an
adaptive average pool and Linear(512 x expansion, ``num_classes``). ResNet-18 uses basic blocks
[2, 2, 2, 2]; ResNet-50 uses bottlenecks [3, 4, 6, 3] with expansion 4 and the stride on the 3x3
conv ("ResNet v1.5", as torchvision). Shortcuts project with 1x1 conv + BN where the shape changes.

Parameter names and counts match torchvision's (ResNet-18: 11,689,512 and ResNet-50: 25,557,032
parameters at 1000 classes), so its state dicts load.

Shapes: input ``(N, C, S, S)`` (default 3 x 224 x 224), output logits ``(N, num_classes)``; the net
downsamples by 32, so ``S >= 32`` (32 or 64 are fine for quick tests).
"""

from __future__ import annotations

import torch
from torch import nn

from prunescope.models import init_weights, register
from prunescope.models.resnet_cifar import BasicBlock, make_stage, projection


class Bottleneck(nn.Module):
    """conv 1x1, BN, ReLU, conv 3x3 (stride), BN, ReLU, conv 1x1 (x4), BN, add shortcut, ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu3 = nn.ReLU()
        self.downsample = projection(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + shortcut)


class ResNet(nn.Module):
    """ImageNet stem, four stages of ``block`` (``blocks`` per stage), average pool, Linear."""

    def __init__(
        self, block: type[nn.Module], blocks: tuple[int, int, int, int], num_classes: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        width = block.expansion
        self.layer1 = make_stage(block, 64, 64, blocks[0], stride=1)
        self.layer2 = make_stage(block, 64 * width, 128, blocks[1], stride=2)
        self.layer3 = make_stage(block, 128 * width, 256, blocks[2], stride=2)
        self.layer4 = make_stage(block, 256 * width, 512, blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register("resnet18", in_channels=3, image_size=224, min_image_size=32)
def resnet18(*, num_classes: int, in_channels: int, image_size: int) -> ResNet:
    """ResNet-18 of He et al. 2016: basic blocks [2, 2, 2, 2], ImageNet stem."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@register("resnet50", in_channels=3, image_size=224, min_image_size=32)
def resnet50(*, num_classes: int, in_channels: int, image_size: int) -> ResNet:
    """ResNet-50 of He et al. 2016: bottlenecks [3, 4, 6, 3] (expansion 4), ImageNet stem."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
