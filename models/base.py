"""The classifier interface every teacher and student follows.

``forward(x)`` returns logits ``(B, K)``; ``forward(x, return_features=True)`` returns ``(logits, features)`` where
``features`` is the list of stage outputs ``[(B, C_k, H_k, W_k), ...]`` from shallow to deep, the last one being the
map that global pooling feeds to the final linear layer. ``classifier_weight()`` is that layer's weight
``(K, C_last)``.
Together they are what the mSARC loss (SPEC §3) needs: spatial attention per stage and a class activation map.
"""

from __future__ import annotations

import torch
from torch import nn


class StagedClassifier(nn.Module):
    """Base class: subclasses define ``stages`` (an ``nn.ModuleList``), ``pool`` and ``fc``."""

    stages: nn.ModuleList
    fc: nn.Linear

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = []
        h = self.forward_stem(x)
        for stage in self.stages:
            h = stage(h)
            features.append(h)
        logits = self.fc(torch.flatten(self.pool(h), 1))
        return (logits, features) if return_features else logits

    def classifier_weight(self) -> torch.Tensor:
        return self.fc.weight


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
