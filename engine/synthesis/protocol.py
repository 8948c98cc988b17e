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

    def take_terms(self) -> dict[str, torch.Tensor]:
        """Each term's sample-weighted mean over the guided steps since the last call (detached device scalars; {}
        when none ran), for the metrics; resets the window."""

    def state_dict(self) -> dict:
        """Everything in flight, copied, so that ``load_state_dict`` continues bit-identically."""

    def load_state_dict(self, state: dict) -> None:
        ...


class PoolCounters:
    """What both pools report at log time: the skipped-latent-step count (device tensor, reset on read) and the
    guidance terms, those of the last guided step and their mean over the log window. Subclasses set
    ``self.skipped``, call :meth:`record_terms` after each guided step and save :meth:`counters_state` with their
    state."""

    skipped: torch.Tensor
    _last_terms: dict
    _term_window: dict  # name → (Σ value·samples, samples) of the finite values since the last take_terms (device)

    def take_skipped(self) -> torch.Tensor:
        out, self.skipped = self.skipped, torch.zeros_like(self.skipped)
        return out

    def last_terms(self) -> dict[str, torch.Tensor]:
        return self._last_terms

    def record_terms(self, terms: dict[str, torch.Tensor], samples: int) -> None:
        """Keep a guided step's terms (means over its ``samples``): as the last step's and in the window's sums. A
        non-finite value stays out of the window (its step is counted as skipped); a term present in only part of
        the window (L_adv after its warm-up) is averaged over the samples it saw. A window without one finite value
        of a term logs it as NaN."""
        self._last_terms = terms
        for name, value in terms.items():
            finite = torch.isfinite(value)
            total, n = self._term_window.get(name, (0.0, 0))
            self._term_window[name] = (total + torch.where(finite, value * samples, 0.0), n + finite * samples)

    def take_terms(self) -> dict[str, torch.Tensor]:
        out = {name: total / n for name, (total, n) in self._term_window.items()}
        self._term_window = {}
        return out

    # Checkpoints: the counters travel with the pool's state so that a resumed run logs the window it was in.
    def counters_state(self) -> dict:
        return {"skipped": self.skipped.clone(),
                "term_window": {k: (total.clone(), n.clone()) for k, (total, n) in self._term_window.items()}}

    def load_counters(self, state: dict, device: torch.device) -> None:
        self.skipped = state["skipped"].to(device)
        self._term_window = {k: (total.to(device), n.to(device))
                             for k, (total, n) in state.get("term_window", {}).items()}
