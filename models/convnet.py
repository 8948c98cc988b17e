"""Small BatchNorm CNNs for 28x28 inputs (the default world's teacher and student).

Three stages at 28, 14 and 7 px; stage k has ``width * 2**k`` channels and one conv (``convnet-wN``) or two
(``convnet2-wN``: a larger receptive field before global pooling, at about the same FLOPs as one conv at 2x width).
``convnet2-w32`` (~0.29M parameters) is the default teacher, ``convnet2-w16`` (~73k) the default student: with a
3×3-conv stack too shallow for the digit (``convnet-wN``), global pooling reads stroke texture, which does not carry
from synthetic to real digits (72% vs 96% on the same synthetic set, BENCHMARKS.md).
"""

from __future__ import annotations

from torch import nn

from models.base import StagedClassifier


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ConvNet(StagedClassifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 64, convs_per_stage: int = 1):
        super().__init__()
        widths = [width, width * 2, width * 4]
        stages, c_in = [], in_channels
        for i, c in enumerate(widths):
            layers = [nn.MaxPool2d(2)] if i > 0 else []  # 28 -> 14 -> 7
            for j in range(convs_per_stage):
                layers.append(conv_bn_relu(c_in if j == 0 else c, c))
            stages.append(nn.Sequential(*layers))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(widths[-1], num_classes)


def convnet(width: int, convs_per_stage: int = 1):
    def build(num_classes: int = 10, in_channels: int = 1) -> ConvNet:
        return ConvNet(num_classes, in_channels, width, convs_per_stage)

    return build
