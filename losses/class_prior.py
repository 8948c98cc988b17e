"""Class-prior loss (SPEC §2 step 3, ``L_cls``): cross-entropy of the teacher's logits against the target classes.

As in DeepInversion (Yin et al., CVPR 2020) and DiffDFKD (Qi et al. 2025), with hard or soft targets::

    L_cls = mean_i  −Σ_k w_ik · log softmax(z_i)_k

``w`` is one-hot for int class ids, or given soft weights, e.g. ``λ, 1−λ`` on the two classes of a latent-CutMix
sample, which makes ``L_cls`` the λ-weighted sum of the two cross-entropies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 (autocast) logits to float32 for a stable softmax; leave float32/float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def class_prior_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross-entropy of ``logits`` (B, K) against int ids (B,) or soft weights (B, K)."""
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
