"""Class-prior loss (SPEC §2 step 3, ``L_cls``): cross-entropy of the teacher's logits against the target classes.

As in DeepInversion (Yin et al., CVPR 2020) and DiffDFKD (Qi et al. 2025), with hard or soft targets::

    L_cls = mean_i  −Σ_k w_ik · log softmax(z_i)_k

``w`` is one-hot for int class ids, or given soft weights, e.g. ``λ, 1−λ`` on the two classes of a latent-CutMix
sample, which makes ``L_cls`` the λ-weighted sum of the two cross-entropies.

With a boundary share ``s > 0`` (``--cls-boundary``, issue 16) the target of each sample becomes::

    w'_i = (1 − s)·w_i + s·e_{r_i},    r_i = argmax_{k : w_ik = 0} z_ik

``r_i`` is the teacher's nearest other class for that sample at this step (its top class among those the sample is
not labelled with), so L_cls pulls the image towards the boundary between its class and that neighbour instead of
deep into its class. Why: in the fashion world the teacher is surer of the guided images that no CutMix touched than
of real images on every class (mean top-1 minus top-2 margin 0.97 against 0.88; shirts 0.985 against 0.68), and the
students agree with it on all of those images while disagreeing on real shirts
(``benchmarks/results/class_signals_fashion.json``). ``r_i`` is chosen without a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 (autocast) logits to float32 for a stable softmax; leave float32/float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def boundary_targets(targets: torch.Tensor, logits: torch.Tensor, share: float) -> torch.Tensor:
    """``(1 − share)·w + share·e_r`` with ``r`` the top class of ``logits`` (B, K) outside each row's labelled
    classes (``w > 0``); ``targets`` are soft weights (B, K). On the device, no host sync."""
    with torch.no_grad():
        nearest = logits.detach().masked_fill(targets > 0, float("-inf")).argmax(dim=1)
        one_hot = (nearest[:, None] == torch.arange(logits.shape[1], device=logits.device)).to(targets.dtype)
    return (1 - share) * targets + share * one_hot


def class_prior_loss(logits: torch.Tensor, targets: torch.Tensor, boundary: float = 0.0) -> torch.Tensor:
    """Batch-mean cross-entropy of ``logits`` (B, K) against int ids (B,) or soft weights (B, K); ``boundary`` > 0
    moves that share of each target onto the sample's nearest other class (see the module docstring)."""
    if boundary > 0:
        if not targets.dtype.is_floating_point:
            targets = (targets.long()[:, None] == torch.arange(logits.shape[1], device=logits.device)).float()
        targets = boundary_targets(targets, logits, boundary)
    if targets.dtype.is_floating_point:
        if targets.shape != logits.shape:
            raise ValueError(
                f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(targets.shape)}"
            )
        log_probs = F.log_softmax(_at_least_float32(logits), dim=1)  # (B, K)
        return -(targets.to(log_probs.dtype) * log_probs).sum(dim=1).mean()
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"class-id targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}")
    return F.cross_entropy(_at_least_float32(logits), targets.long())
