"""DeepInversion (Yin et al., CVPR 2020) as a generator with the guided sampler's interface: no prior, the pixels
themselves are optimised from noise by Adam against α·L_bn + β·L_cls + γ·L_adv + λ_tv·TV (one Adam step per
loop tick), so the co-training loop runs it exactly like the diffusion generator.

Weights: DeepInversion needs the BN term to dominate (pixels have no prior to keep them natural); its defaults
follow the CIFAR settings of the DeepInversion/CMI code bases (bn 10, cls 1), total variation 1e-3·mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from losses import BNStatHooks, WeightedSum, adversarial_loss, class_prior_loss


@dataclass
class PixelBatch:
    pixels: torch.Tensor  # (B, C, H, W) in [0, 1], teacher resolution
    labels: torch.Tensor
    label_weights: torch.Tensor
    seeds: torch.Tensor
    optimizer: torch.optim.Optimizer
    total_steps: int
    step_index: int = 0
    skipped: torch.Tensor | None = None
    last_terms: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps

    def __len__(self) -> int:
        return len(self.labels)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class DeepInversionGenerator:
    def __init__(self, teacher: nn.Module, teacher_view, num_classes: int, bn: float, cls: float, adv: float,
                 steps: int, lr: float, divergence: str = "kl", tv: float = 1e-3, first_bn_multiplier: float = 1.0):
        self.teacher, self.view, self.num_classes = teacher, teacher_view, num_classes
        self.steps, self.lr, self.tv, self.divergence = steps, lr, tv, divergence
        self.weights = {"bn": bn, "cls": cls, "adv": 0.0}
        self.adv_weight = adv
        self.weighted = WeightedSum(self.weights, name="L_deepinv")
        self.first_bn_multiplier = first_bn_multiplier
        self.device = next(teacher.parameters()).device

    def set_weights(self, **weights: float) -> None:
        self.weights.update(weights)
        self.weighted = WeightedSum(self.weights, name="L_deepinv")

    def start(self, labels: torch.Tensor, seeds: torch.Tensor) -> PixelBatch:
        shape = (self.view.channels, self.view.size, self.view.size)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        pixels = (0.5 + 0.2 * noise).clamp(0, 1).to(self.device).requires_grad_(True)
        labels = labels.to(self.device)
        return PixelBatch(pixels, labels, F.one_hot(labels, self.num_classes).float(), seeds.cpu(),
                          torch.optim.Adam([pixels], lr=self.lr, betas=(0.5, 0.99)), self.steps,
                          skipped=torch.zeros((), dtype=torch.long, device=self.device))

    @torch.enable_grad()
    def step(self, batch: PixelBatch, student: nn.Module | None = None) -> None:
        x = self.view.normalize(batch.pixels)
        with BNStatHooks(self.teacher, first_multiplier=self.first_bn_multiplier) as bn_hooks:  # one forward
            logits = self.teacher(x)
            terms = {"bn": bn_hooks.loss(), "cls": class_prior_loss(logits, batch.label_weights)}
        if self.weights["adv"] and student is not None:
            terms["adv"] = adversarial_loss(logits, student(x), divergence=self.divergence)
        elif self.weights["adv"]:
            terms["adv"] = logits.new_zeros(())
        loss = self.weighted(terms) + self.tv * total_variation(batch.pixels)
        batch.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        finite = torch.isfinite(batch.pixels.grad).flatten(1).all(1)
        batch.skipped += (~finite).sum()
        batch.pixels.grad[~finite] = 0
        batch.optimizer.step()
        with torch.no_grad():
            batch.pixels.clamp_(0, 1)
        batch.last_terms = {k: v.detach() for k, v in terms.items()} | {"L_inv": loss.detach()}
        batch.step_index += 1

    @torch.no_grad()
    def finish(self, batch: PixelBatch) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch.pixels.detach().clamp(0, 1)
        return images, self.teacher(self.view.normalize(images))
