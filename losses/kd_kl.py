"""Temperature-scaled KL distillation loss (SPEC §3, first term of ``L_kd``).

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015::

    L_KL = τ² · mean_i KL(softmax(t_i/τ) ‖ softmax(s_i/τ)) = τ² · mean_i Σ_k p_T^τ (log p_T^τ − log p_S^τ)

The τ² factor keeps the gradient magnitude comparable across temperatures. The teacher side is detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 (autocast) logits to float32 for a stable softmax; leave float32/float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(p_T^τ ‖ p_S^τ)`` of each sample, summed over classes: (B,)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_p_s = F.log_softmax(_at_least_float32(student_logits) / temperature, dim=1)  # (B, K)
    log_p_t = F.log_softmax(_at_least_float32(teacher_logits.detach()) / temperature, dim=1)  # (B, K)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``τ²·KL(p_T^τ ‖ p_S^τ)``, the per-sample KL summed over classes and averaged over the batch."""
    return temperature**2 * _kl_per_sample(student_logits, teacher_logits, temperature).mean()


def kd_kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The loss's term of each sample before the batch mean, ``τ²·KL_i``: (B,) (for per-class readouts)."""
    return temperature**2 * _kl_per_sample(student_logits, teacher_logits, temperature)
