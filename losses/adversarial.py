"""Adversarial (teacher–student disagreement) loss (SPEC §2 step 3, ``L_adv``).

Fang et al., "Contrastive Model Inversion for Data-Free Knowledge Distillation", IJCAI 2021, as used by DiffDFKD
(Qi et al. 2025)::

    L_adv = −mean_i( m_i · D(p_T,i ‖ p_S,i) ),   m_i = 1[argmax p_T,i = argmax p_S,i]

with ``D`` either ``KL(p_T‖p_S) = Σ_k p_T (log p_T − log p_S)`` or the Jensen–Shannon divergence
``JS = ½·KL(p_T‖M) + ½·KL(p_S‖M)``, ``M = (p_T + p_S)/2``. Minimising ``L_adv`` pushes samples the student already
gets right toward where it disagrees with the teacher; samples where the two already disagree are masked out so
they do not drift off the teacher's class. The mask is a constant; masked samples count as zero in the batch mean.
Gradients flow into both logit inputs (the synthesized images get gradient through both networks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 (autocast) logits to float32 for a stable softmax; leave float32/float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


DIVERGENCES = ("kl", "js")


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(p‖q) = Σ_k p (log p − log q)`` for log-probabilities (B, K) -> (B,)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def adversarial_loss(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, divergence: str = "kl"
) -> torch.Tensor:
    """``−mean_i(m_i · D(p_T,i ‖ p_S,i))`` over the batch; ``divergence`` is ``"kl"`` or ``"js"``."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    log_p_t = F.log_softmax(_at_least_float32(teacher_logits), dim=1)  # (B, K)
    log_p_s = F.log_softmax(_at_least_float32(student_logits), dim=1)  # (B, K)
    with torch.no_grad():
        mask = (teacher_logits.argmax(dim=1) == student_logits.argmax(dim=1)).float()  # (B,)
    if divergence == "kl":
        per_sample = _kl_from_log_probs(log_p_t, log_p_s)
    else:
        log_m = torch.logsumexp(torch.stack([log_p_t, log_p_s]), dim=0) - math.log(2.0)  # log((p_T + p_S) / 2)
        per_sample = 0.5 * _kl_from_log_probs(log_p_t, log_m) + 0.5 * _kl_from_log_probs(log_p_s, log_m)
    return -(mask * per_sample).mean()
