"""Latent CutMix (DiffDFKD, Qi et al. 2025, §3.3) and the band mask its seam repair regenerates.

CutMix (Yun et al., ICCV 2019) applied to diffusion latents mid-trajectory: sample i receives a box cut from sample
``perm[i]``; with ``λ ~ Beta(β, β)`` the box covers a fraction ``1 − λ`` of the latent (clipped at the borders, λ is
then recomputed from the real box), and the mixed sample's soft label is ``λ·y_i + (1 − λ)·y_perm[i]``. Pairs may
have different classes. Every sample gets its own box, so one call mixes a whole batch without a host round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CutMixResult:
    perm: torch.Tensor  # (B,) source sample of each box
    box: torch.Tensor  # (B, 1, H, W) bool, True inside the pasted box
    lam: torch.Tensor  # (B,) fraction of sample i that is still its own


def sample_boxes(batch: int, height: int, width: int, beta: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample CutMix boxes: returns ``box`` (B, 1, H, W) bool and the exact ``lam`` (B,) = 1 − area/(H·W).
    Drawn on the generator's device (``device`` without one), so nothing is copied from the host."""
    where = generator.device if generator is not None else torch.device(device)
    lam = torch.distributions.Beta(beta, beta).sample((batch,)).to(where) if generator is None else \
        _beta(beta, batch, generator)
    cut = torch.sqrt(1.0 - lam)  # side ratio: box area = (1 - λ)·H·W before clipping
    centre = torch.rand(2, batch, generator=generator, device=where)
    cy, cx = (centre[0] * height).floor(), (centre[1] * width).floor()
    half_h, half_w = (cut * height / 2).round(), (cut * width / 2).round()
    top, bottom = (cy - half_h).clamp(0, height), (cy + half_h).clamp(0, height)
    left, right = (cx - half_w).clamp(0, width), (cx + half_w).clamp(0, width)
    rows, cols = torch.arange(height, device=where)[None, :], torch.arange(width, device=where)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < right[:, None])  # (B, W)
    box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B, 1, H, W)
    lam = 1.0 - box.flatten(1).float().mean(1)
    return box.to(device), lam.to(device)


def _beta(beta: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """Beta(β, β) from two seeded Gammas (torch's Beta sampler takes no generator)."""
    a = torch._standard_gamma(torch.full((n,), float(beta), device=generator.device), generator=generator)
    b = torch._standard_gamma(torch.full((n,), float(beta), device=generator.device), generator=generator)
    return a / (a + b)


def latent_cutmix(batch: int, height: int, width: int, beta: float = 1.0,
                  generator: torch.Generator | None = None, device="cpu", prob: float = 1.0) -> CutMixResult:
    """Draw pairs and boxes for a batch; apply them with :func:`apply_cutmix` to latents and labels alike.
    Each sample is mixed with probability ``prob`` (the others get an empty box and λ = 1)."""
    where = generator.device if generator is not None else torch.device(device)
    perm = torch.randperm(batch, generator=generator, device=where).to(device)
    box, lam = sample_boxes(batch, height, width, beta, generator, device)
    if prob < 1.0:
        keep = (torch.rand(batch, generator=generator, device=where) < prob).to(device)
        box, lam = box & keep[:, None, None, None], torch.where(keep, lam, torch.ones_like(lam))
    return CutMixResult(perm, box, lam)


def apply_cutmix(x: torch.Tensor, mix: CutMixResult) -> torch.Tensor:
    """Paste ``x[perm[i]]`` into ``x[i]`` inside box i. ``x``: (B, C, H, W)."""
    return torch.where(mix.box, x[mix.perm], x)


def mix_labels(label_weights: torch.Tensor, mix: CutMixResult) -> torch.Tensor:
    """Soft labels (B, K): ``λ·y_i + (1 − λ)·y_perm[i]``."""
    lam = mix.lam[:, None].to(label_weights.dtype)
    return lam * label_weights + (1 - lam) * label_weights[mix.perm]


def seam_band(box: torch.Tensor, width: int) -> torch.Tensor:
    """The band of ``width`` pixels on both sides of each box edge: dilate(box) minus erode(box). (B, 1, H, W) bool.

    Edges that lie on the latent border are no seam and get no band.
    """
    if width <= 0:
        return torch.zeros_like(box)
    k = 2 * width + 1
    b = box.float()
    dilated = F.max_pool2d(b, k, stride=1, padding=width) > 0
    # Erode with the outside treated as "inside" so a box touching the border keeps its border pixels.
    eroded = -F.max_pool2d(-F.pad(b, (width,) * 4, value=1.0), k, stride=1) > 0
    return dilated & ~eroded
