"""A named weighted sum of loss terms that prints its own formula (torchdistill-style).

    L = Σ_n w_n · term_n      over the terms with w_n ≠ 0

Used for ``L_inv = α·bn + β·cls + γ·adv`` (SPEC §2 step 3) and ``L_kd = 1·kl + μ·msarc`` (SPEC §3). Terms with zero
weight are left out of the sum, of :attr:`WeightedSum.active` (so callers can skip computing them) and of the
formula string.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def _format_weight(weight: float) -> str:
    return f"{weight:g}"


class WeightedSum:
    """``WeightedSum({"bn": 0.1, "cls": 10, "adv": 0.5}, name="L_inv")``; call it with a ``{name: tensor}`` dict."""

    def __init__(self, weights: Mapping[str, float], name: str = "L"):
        for term, weight in weights.items():
            if not math.isfinite(float(weight)):
                raise ValueError(f"weight of {term!r} must be finite, got {weight}")
        self.name = name
        self.weights: dict[str, float] = {term: float(weight) for term, weight in weights.items()}

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the terms with a non-zero weight, in construction order."""
        return tuple(term for term, weight in self.weights.items() if weight != 0.0)

    def __call__(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``Σ weight·term`` over the active terms. Raises KeyError for a missing active term or an unknown name."""
        unknown = [term for term in terms if term not in self.weights]
        if unknown:
            raise KeyError(f"{self.name}: unknown loss terms {unknown}; known: {list(self.weights)}")
        missing = [term for term in self.active if term not in terms]
        if missing:
            raise KeyError(f"{self.name}: missing loss terms {missing} (their weights are non-zero)")
        if not self.active:
            reference = next(iter(terms.values()), None)
            return torch.zeros((), device=reference.device if reference is not None else None)
        total = 0
        for term in self.active:
            total = total + self.weights[term] * terms[term]
        return total

    def formula(self) -> str:
        """E.g. ``"L_inv = 0.1·bn + 10·cls + 0.5·adv"``; zero-weight terms omitted, ``"L = 0"`` when none is active."""
        parts = []
        for term in self.active:
            weight = self.weights[term]
            sign = "-" if weight < 0 else "+"
            parts.append((sign, f"{_format_weight(abs(weight))}·{term}"))
        if not parts:
            return f"{self.name} = 0"
        first_sign, first = parts[0]
        text = ("-" if first_sign == "-" else "") + first
        for sign, piece in parts[1:]:
            text += f" {sign} {piece}"
        return f"{self.name} = {text}"

    def __repr__(self) -> str:
        return f"WeightedSum({self.formula()!r})"
