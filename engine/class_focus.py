"""``--class-focus F``: the classes of new images follow the student's per-class loss (online schedule; issue 16).

Round-robin classes give every class the same share of the image budget, however well the student already
matches the teacher on it. With F > 0, each student step adds its per-sample distillation loss
``τ²·KL(p_T^τ ‖ p_S^τ)`` to the classes of its images (the soft targets: a CutMix image counts for both of its
classes by their mix weights), on the device. At each metrics line (already a host sync), the window's mean per
class ``m_k`` sets the class probabilities of the micro-batches started from then on::

    p_k ∝ m_k^F        (F = 0: uniform; F = 1: proportional to the loss; a class absent from the window keeps p_k)

Until the first metrics line after training starts, classes stay round-robin. Offline runs never train while they
generate, so their classes stay round-robin whatever F is. Only the online schedule can do this: it is, beside
L_adv, the second way the generator reads the current student.

Measured (BENCHMARKS.md "β = 5 at η = 0.05 (one seed) and a class focus", fashion, 3 seeds): F = 2 is within
noise of round-robin at the end of the run, ahead while generating. The loss is read on the synthetic images,
where it ranks the classes nearly against the student's real disagreement with the teacher (Spearman −0.7; the
real weak class, shirts, has the lowest synthetic loss: ``benchmarks.class_signals``), so it is off by default.
"""

from __future__ import annotations

import torch

from losses import kd_kl_per_sample


def class_kd_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: (Σ_i w_ik · τ²·KL_i, Σ_i w_ik), with w the (B, K) soft targets and τ²·KL_i the per-sample KD term
    (``losses.kd_kl_per_sample``). Two (K,) device tensors (detached)."""
    with torch.no_grad():
        kl = kd_kl_per_sample(student_logits.float(), teacher_logits.float(), temperature)  # (B,)
        weights = targets.float()
        return weights.T @ kl, weights.sum(dim=0)


def class_means(sums: torch.Tensor, counts: torch.Tensor) -> list[float | None]:
    """A window's mean loss per class, sums_k / counts_k (host values); None for a class not seen (no weight, or a
    non-finite sum)."""
    return [float(s / c) if c > 0 and torch.isfinite(s) else None for s, c in zip(sums, counts)]


def focus_probs(sums: torch.Tensor, counts: torch.Tensor, previous: list[float] | None, focus: float) -> list[float]:
    """Class probabilities from a window's per-class loss sums and counts (host values): p_k ∝ (sums_k /
    counts_k)^focus over the classes seen, a class not seen keeping its previous share (uniform at first)."""
    means = class_means(sums, counts)
    previous = previous or [1.0 / len(means)] * len(means)
    seen = [i for i, mean in enumerate(means) if mean is not None]
    if not seen:
        return list(previous)
    mass = sum(previous[i] for i in seen)  # the share the seen classes had, redistributed among them
    scores = {i: max(means[i], 1e-12) ** focus for i in seen}
    total = sum(scores.values())
    return [mass * scores[i] / total if i in scores else previous[i] for i in range(len(means))]


def draw_labels(probs: list[float], n: int, seed: int) -> torch.Tensor:
    """``n`` class labels drawn from ``probs`` with a generator of their own (the same labels on every process and
    after a resume)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.tensor(probs, dtype=torch.float64), n, replacement=True, generator=generator)
