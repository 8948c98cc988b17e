"""CIFAR-style ResNets: a 3x3 stem without max-pooling, so 32x32 inputs keep full resolution in the first stage.

``resnet18``/``resnet34`` (He et al. 2016, ImageNet widths 64..512 over four stages) are the usual DFKD teachers on
CIFAR; ``resnet8``/``resnet20`` (the paper's CIFAR variant: three stages of 16/32/64 channels, ``6n+2`` layers) are
the small students of the CRD/CMI benchmarks. Stages are the residual groups; strides 1, 2, 2(, 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.base import StagedClassifier


def init_kaiming(model: nn.Module) -> None:
    """He-normal convolutions (fan_out, ReLU), unit BatchNorm, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; a 1x1 projection when the shape changes (option B)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))  # never in place on x: it may be a returned stage feature


class CifarResNet(StagedClassifier):
    def __init__(self, blocks: Sequence[int], widths: Sequence[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, c_in = [], widths[0]
        for i, (n, c) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            group = [BasicBlock(c_in if j == 0 else c, c, stride if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*group))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_kaiming(self)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)  # (B, C_0, H, W)


def cifar_resnet(blocks: Sequence[int], widths: Sequence[int]):
    def build(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(blocks, widths, num_classes, in_channels)

    return build


RESNETS = {
    "resnet8": cifar_resnet([1, 1, 1], [16, 32, 64]),
    "resnet20": cifar_resnet([3, 3, 3], [16, 32, 64]),
    "resnet18": cifar_resnet([2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet34": cifar_resnet([3, 4, 6, 3], [64, 128, 256, 512]),
}
