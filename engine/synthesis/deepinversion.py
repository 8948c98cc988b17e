"""DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020) as a generator of the co-training loop: no prior, the
pixels themselves are optimised from noise, one Adam step per loop tick; :class:`DeepInversionPool` is its
:class:`~engine.synthesis.protocol.GenerationPool`, so the loop runs it exactly like the diffusion pool.

The published recipe (NVlabs/DeepInversion), per iteration on the batch ``x`` in the teacher's normalised space:

    x_jit = flip?(roll(x, (δh, δw)))          δ ~ U{−J, …, J} per iteration, a horizontal flip with probability ½
    L = β·CE(T(x_jit), y) + α·Σ_l m_l·L_bn,l(x_jit) + λ_tv1·TV_1(x_jit) + λ_tv2·TV_2(x_jit) + λ_l2·mean_i ‖x_jit,i‖₂
        (+ γ·L_adv against the student, the "adaptive" ADI variant)

with ``m_0`` the first-BN multiplier (``m_l = 1`` for l > 0), ``TV_1`` the mean absolute difference and ``TV_2``
the summed L2 norm of the differences between neighbouring pixels in four directions (right, down, and both
diagonals), Adam with betas (0.5, 0.9) under a cosine learning-rate decay over the iterations, and the pixels kept
in the valid range after each step. The optimised images start as the teacher's mean plus its std times N(0, 1).

Defaults (``RunConfig.deepinv_*``): the published first-BN multiplier 10, TV-L2 1e-4, L2 1e-5 and TV-L1 0;
α = 10, β = 1 as in the CIFAR settings of the DeepInversion/CMI code bases (the ImageNet α = 0.05 is for a
224-px ResNet-50's 53 BN layers); jitter 2 px, the CIFAR scale of ImageNet's 30 px at 224; flips follow
``--aug-flip`` (off for digits, whose mirror images change class). Published runs use 2k iterations per batch;
our default is 100 (``--deepinv-iters``) to fit the CPU budget.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.synthesis.protocol import Finished, PoolCounters
from losses import BNStatHooks, WeightedSum, adversarial_loss, class_prior_loss


@dataclass
class DeepInversionConfig:
    bn: float = 10.0  # α
    cls: float = 1.0  # β (the main-loss multiplier)
    adv: float = 0.0  # γ (the engine turns it on after its warm-up)
    tv_l1: float = 0.0
    tv_l2: float = 1e-4
    l2: float = 1e-5
    first_bn_multiplier: float = 10.0
    jitter: int = 2  # px
    flip: bool = False
    steps: int = 100
    lr: float = 0.1  # Adam, on pixels in [0, 1] (the published 0.2-0.25 act on normalised pixels)
    divergence: str = "kl"

    def weights(self) -> dict[str, float]:
        return {"bn": self.bn, "cls": self.cls, "adv": self.adv, "tv_l1": self.tv_l1, "tv_l2": self.tv_l2,
                "l2": self.l2}


@dataclass
class PixelBatch:
    pixels: torch.Tensor  # (B, C, H, W) in [0, 1], teacher resolution
    labels: torch.Tensor
    label_weights: torch.Tensor
    seeds: torch.Tensor
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # jitter offsets and flips
    total_steps: int
    step_index: int = 0
    skipped: torch.Tensor | None = None
    last_terms: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps

    def __len__(self) -> int:
        return len(self.labels)


def image_prior_losses(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(TV_1, TV_2) over the four neighbour directions: mean |Δ| summed over directions, and Σ ‖Δ‖₂."""
    diffs = [x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
             x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:]]
    return sum(d.abs().mean() for d in diffs), sum(torch.linalg.vector_norm(d) for d in diffs)


class DeepInversionGenerator:
    def __init__(self, teacher: nn.Module, teacher_view, num_classes: int, config: DeepInversionConfig):
        self.teacher, self.view, self.num_classes, self.config = teacher, teacher_view, num_classes, config
        self.weighted = WeightedSum(config.weights(), name="L_deepinv")
        self.device = next(teacher.parameters()).device

    def set_weights(self, **weights: float) -> None:
        for name, value in weights.items():
            setattr(self.config, name, value)
        self.weighted = WeightedSum(self.config.weights(), name="L_deepinv")

    def start(self, labels: torch.Tensor, seeds: torch.Tensor) -> PixelBatch:
        """Noise N(0, 1) in the teacher's normalised space, one generator per sample seed, clipped to [0, 1]."""
        shape = (self.view.channels, self.view.size, self.view.size)
        seed_list = seeds.tolist()
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seed_list])
        noise = noise.to(self.device, non_blocking=True)
        pixels = (self.view.mean[0] + self.view.std[0] * noise).clamp(0, 1).requires_grad_(True)
        labels = labels.to(self.device, non_blocking=True)
        # One-hot by comparison: F.one_hot checks the id range with a device read.
        one_hot = (labels[:, None] == torch.arange(self.num_classes, device=self.device)).float()
        return PixelBatch(pixels, labels, one_hot, seeds.cpu(),
                          torch.optim.Adam([pixels], lr=self.config.lr, betas=(0.5, 0.9), eps=1e-8),
                          torch.Generator().manual_seed(seed_list[0] * 1_000_003 + 29), self.config.steps,
                          skipped=torch.zeros((), dtype=torch.long, device=self.device))

    def jitter(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random roll by up to ``jitter`` px in each direction and, with ``flip``, a mirror half of the time."""
        cfg = self.config
        # Host generator, read with tolist (no device scalar read; the draws are the same as bool()/int() would see).
        dy, dx, flip = torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=generator).tolist() + \
            [(torch.rand((), generator=generator) < 0.5).tolist()]
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3)) if dy or dx else x
        return x.flip(3) if cfg.flip and flip else x

    @torch.enable_grad()
    def step(self, batch: PixelBatch, student: nn.Module | None = None) -> None:
        cfg = self.config
        for group in batch.optimizer.param_groups:  # cosine decay over the batch's iterations
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * batch.step_index / batch.total_steps))
        x = self.jitter(self.view.normalize(batch.pixels), batch.generator)
        with BNStatHooks(self.teacher, first_multiplier=cfg.first_bn_multiplier) as bn_hooks:  # one forward
            logits = self.teacher(x)
            terms = {"bn": bn_hooks.loss(), "cls": class_prior_loss(logits, batch.label_weights)}
        terms["tv_l1"], terms["tv_l2"] = image_prior_losses(x)
        terms["l2"] = torch.linalg.vector_norm(x.flatten(1), dim=1).mean()
        if cfg.adv and student is not None:
            terms["adv"] = adversarial_loss(logits, student(x), divergence=cfg.divergence)
        elif cfg.adv:
            terms["adv"] = logits.new_zeros(())
        loss = self.weighted(terms)
        batch.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        finite = torch.isfinite(batch.pixels.grad).flatten(1).all(1)
        batch.skipped += (~finite).sum()
        # A sample with a non-finite gradient gets none (Adam then moves it only by its earlier moments); no sync.
        batch.pixels.grad = torch.where(finite[:, None, None, None], batch.pixels.grad, 0.0)
        batch.optimizer.step()
        with torch.no_grad():
            batch.pixels.clamp_(0, 1)
        batch.last_terms = {k: v.detach() for k, v in terms.items()} | {"L_inv": loss.detach()}
        batch.step_index += 1

    @torch.no_grad()
    def finish(self, batch: PixelBatch) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch.pixels.detach().clamp(0, 1)
        return images, self.teacher(self.view.normalize(images))

    # Checkpoints: a batch in flight, saved and restored exactly ------------------------------------------------------
    def batch_state(self, batch: PixelBatch) -> dict:
        """A copy (the live batch keeps stepping in place) of everything the rest of its optimisation needs."""
        return copy.deepcopy({
            "pixels": batch.pixels.detach(), "labels": batch.labels, "seeds": batch.seeds,
            "optimizer": batch.optimizer.state_dict(), "generator": batch.generator.get_state(),
            "total_steps": batch.total_steps, "step_index": batch.step_index, "skipped": batch.skipped})

    def restore_batch(self, state: dict) -> PixelBatch:
        batch = self.start(state["labels"], state["seeds"])
        with torch.no_grad():
            batch.pixels.copy_(state["pixels"].to(self.device))
        batch.optimizer.load_state_dict(state["optimizer"])
        batch.generator.set_state(state["generator"])
        batch.total_steps, batch.step_index = state["total_steps"], state["step_index"]
        batch.skipped = state["skipped"].to(self.device)
        return batch


class DeepInversionPool(PoolCounters):
    """The micro-batches in flight of a :class:`DeepInversionGenerator`, each with its own Adam state and cosine
    schedule (so they stay separate batches: one Adam step each per tick)."""

    def __init__(self, generator: DeepInversionGenerator):
        self.generator = generator
        self.batches: list[PixelBatch] = []
        self.skipped = torch.zeros((), dtype=torch.long, device=generator.device)
        self._last_terms: dict[str, torch.Tensor] = {}
        self._term_window: dict = {}

    @property
    def weighted(self) -> WeightedSum:
        return self.generator.weighted

    def set_weights(self, **weights: float) -> None:
        self.generator.set_weights(**weights)

    @property
    def in_flight(self) -> int:
        return len(self.batches)

    def admit(self, labels: torch.Tensor, seeds: torch.Tensor) -> None:
        self.batches.append(self.generator.start(labels, seeds))

    def tick(self, student: nn.Module | None = None) -> list[Finished]:
        for batch in self.batches:
            self.generator.step(batch, student)
            self.skipped += batch.skipped
            batch.skipped.zero_()
            self.record_terms(batch.last_terms, len(batch))
        finished = []
        while self.batches and self.batches[0].done:  # equal step counts: batches finish in start order
            batch = self.batches.pop(0)
            images, logits = self.generator.finish(batch)
            finished.append(Finished(images, logits, batch.label_weights, batch.seeds))
        return finished

    def state_dict(self) -> dict:
        return {"batches": [self.generator.batch_state(b) for b in self.batches], **self.counters_state()}

    def load_state_dict(self, state: dict) -> None:
        self.batches = [self.generator.restore_batch(saved) for saved in state["batches"]]
        self.load_counters(state, self.generator.device)
