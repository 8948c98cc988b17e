"""What the co-training loop needs from a generator: a pool of samples in flight that it advances one tick at a time.

Both generators implement it: the diffusion pool (:class:`engine.synthesis.pool.DiffusionPool`, one latent tensor
for every sample in flight) and DeepInversion (:class:`engine.synthesis.deepinversion.DeepInversionPool`). The loop
decides on the host when a micro-batch starts (``admit``); ``tick`` then moves everything in flight one step against
the student snapshot and hands back what finished. Nothing here reads a device value on the host: counts that live
on the device (``skipped``) are read by the loop at its log intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from losses import WeightedSum


@dataclass
class Finished:
    """One micro-batch whose synthesis is over."""

    images: torch.Tensor  # (B, C, H, W) in [0, 1], at the teacher's resolution and channels
    logits: torch.Tensor  # (B, K) the teacher's logits on ``images``
    label_weights: torch.Tensor  # (B, K) soft labels (one-hot unless CutMix mixed two classes)
    seeds: torch.Tensor  # (B,) the sample seeds

    def __len__(self) -> int:
        return len(self.images)


@runtime_checkable
class GenerationPool(Protocol):
    weighted: WeightedSum  # L_inv; ``weighted.active`` names the terms in use
    in_flight: int  # micro-batches admitted and not finished (a host count)

    def set_weights(self, **weights: float) -> None:
        """Change term weights during a run (e.g. γ of L_adv after its warm-up)."""

    def admit(self, labels: torch.Tensor, seeds: torch.Tensor) -> None:
        """Start a micro-batch: labels (B,) and sample seeds (B,), host tensors; a sample's start is a function of
        its seed alone."""

    def tick(self, student: nn.Module | None) -> list[Finished]:
        """Advance every sample in flight by one step (L_adv against ``student``); the micro-batches that finished,
        oldest first."""

    def take_skipped(self) -> torch.Tensor:
        """Latent steps skipped for a non-finite gradient since the last call (a device scalar)."""

    def last_terms(self) -> dict[str, torch.Tensor]:
        """The terms of the last guided step (detached, on the device), for the metrics."""

    def state_dict(self) -> dict:
        """Everything in flight, copied, so that ``load_state_dict`` continues bit-identically."""

    def load_state_dict(self, state: dict) -> None:
        ...


class PoolCounters:
    """What both pools report at log time: the skipped-latent-step count (device tensor, reset on read) and the
    last guidance terms. Subclasses set ``self.skipped`` and ``self._last_terms``."""

    skipped: torch.Tensor
    _last_terms: dict

    def take_skipped(self) -> torch.Tensor:
        out, self.skipped = self.skipped, torch.zeros_like(self.skipped)
        return out

    def last_terms(self) -> dict[str, torch.Tensor]:
        return self._last_terms
