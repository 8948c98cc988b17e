"""CIFAR-style VGG with BatchNorm (Simonyan & Zisserman 2015, in the layout of the CRD/CMI benchmarks).

Five blocks of conv-BN-ReLU at 64/128/256/512/512 channels with 2x2 max-pooling between them (32 -> 16 -> 8 -> 4 -> 2
px; 28 -> 14 -> 7 -> 3 -> 1 for 28x28 inputs), then global average pooling and one linear layer, so the CAM of the
last block is exact. ``vgg8-bn`` has one conv per block, ``vgg11-bn`` the VGG-A layout (1, 1, 2, 2, 2).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from models.base import StagedClassifier
from models.cifar_resnet import init_kaiming

WIDTHS = (64, 128, 256, 512, 512)


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class VGG(StagedClassifier):
    def __init__(self, convs_per_block: Sequence[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        stages, c_in = [], in_channels
        for i, (n, c) in enumerate(zip(convs_per_block, WIDTHS)):
            layers = [nn.MaxPool2d(2)] if i > 0 else []
            for j in range(n):
                layers.append(conv_bn_relu(c_in if j == 0 else c, c))
            stages.append(nn.Sequential(*layers))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(WIDTHS[-1], num_classes)
        init_kaiming(self)


def vgg(convs_per_block: Sequence[int]):
    def build(num_classes: int = 10, in_channels: int = 3) -> VGG:
        return VGG(convs_per_block, num_classes, in_channels)

    return build


VGGS = {"vgg8-bn": vgg([1, 1, 1, 1, 1]), "vgg11-bn": vgg([1, 1, 2, 2, 2])}
