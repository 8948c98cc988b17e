"""Wide ResNets (Zagoruyko & Komodakis 2016): WRN-d-k has three groups of ``(d - 4) / 6`` pre-activation blocks
with 16k/32k/64k channels at strides 1, 2, 2 after a 3x3 stem of 16 channels.

Pre-activation blocks leave the residual sum un-normalised, so the final BN + ReLU is folded into the last stage:
the last stage feature is the post-activation map that global pooling feeds to the classifier, as the CAM assumes.
"""

from __future__ import annotations

import torch
from torch import nn

from models.base import StagedClassifier
from models.cifar_resnet import conv3x3, init_kaiming


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; when the shape changes, the shortcut is a 1x1 conv of the pre-activated input."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), conv3x3(c_in, c_out, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), conv3x3(c_out, c_out)
        self.relu = nn.ReLU(inplace=True)
        self.projection = None
        if stride != 1 or c_in != c_out:
            self.projection = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = x if self.projection is None else self.projection(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class WideResNet(StagedClassifier):
    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.stem = conv3x3(in_channels, 16)
        stages, c_in = [], 16
        for i, c in enumerate(widths):
            stride = 1 if i == 0 else 2
            group = [PreActBlock(c_in if j == 0 else c, c, stride if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*group))
            c_in = c
        stages[-1].append(nn.BatchNorm2d(widths[-1]))
        stages[-1].append(nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_kaiming(self)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)  # (B, 16, H, W)


def wide_resnet(depth: int, widen: int):
    def build(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_channels)

    return build


WIDE_RESNETS = {f"wrn-{d}-{k}": wide_resnet(d, k) for d in (16, 40) for k in (1, 2)}
