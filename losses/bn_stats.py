"""DeepInversion BatchNorm-statistics loss (SPEC §2 step 3, ``L_bn``).

Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020, eq. (4)::

    L_bn(x) = Σ_l  ‖μ_l(x) − μ_l^run‖₂ + ‖σ²_l(x) − σ²_l^run‖₂

where, for the input of BatchNorm layer l, ``μ_l(x)`` and ``σ²_l(x)`` are the per-channel batch mean and biased batch
variance (over every dimension except the channel one: N,H,W for 2-D maps, N or N,L for ``BatchNorm1d``), and
``μ^run``, ``σ²^run`` are the layer's running statistics. Both norms are plain (not squared) L2 norms, as in the
paper's reference code. The first BN layer's term may carry an extra weight (``first_multiplier``), as DeepInversion
and later DFKD code do to emphasise low-level statistics.

The statistics are read in forward *pre*-hooks, so the running buffers are the ones before any update even if the
teacher were left in train mode (it should be frozen and in eval mode).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _batch_stat_term(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """``‖μ_batch − μ_run‖₂ + ‖σ²_batch − σ²_run‖₂`` for one BN input ``x`` of shape (N, C, *)."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # half inputs under autocast -> float32
    x, running_mean, running_var = x.to(dtype), running_mean.to(dtype), running_var.to(dtype)
    dims = [0, *range(2, x.dim())]  # every dim except channels: (N,), (N, L), (N, H, W), ...
    mean = x.mean(dim=dims)  # (C,)
    var = x.var(dim=dims, unbiased=False)  # (C,) biased, like BN's normalisation
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


class BNStatHooks:
    """Owns forward hooks on every BatchNorm layer of ``model`` and turns their inputs into the DeepInversion loss.

    Usage::

        with BNStatHooks(teacher, first_multiplier=1.0) as bn:
            logits = teacher(x)
            loss = bn.loss()

    Only the most recent forward of ``model`` is recorded: a pre-hook on ``model`` clears the terms each time it is
    called. Layers without running statistics (``track_running_stats=False``) are skipped. The hooks stay attached
    until :meth:`remove` (or the end of the ``with`` block).
    """

    def __init__(self, model: nn.Module, first_multiplier: float = 1.0):
        self.first_multiplier = float(first_multiplier)
        self._layers = [
            m
            for m in model.modules()
            if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
        ]
        self._terms: dict[int, torch.Tensor] = {}
        first_param = next(model.parameters(), None)
        self._device = first_param.device if first_param is not None else torch.device("cpu")
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._clear)]
        for index, layer in enumerate(self._layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_hook(index)))

    @property
    def has_batchnorm(self) -> bool:
        return bool(self._layers)

    def _clear(self, module: nn.Module, inputs) -> None:
        self._terms.clear()

    def _make_hook(self, index: int):
        def hook(module: _BatchNorm, inputs) -> None:
            self._terms[index] = _batch_stat_term(inputs[0], module.running_mean, module.running_var)

        return hook

    def per_layer(self) -> list[torch.Tensor]:
        """The unweighted term of every BN layer reached in the last forward, in module order."""
        return [self._terms[i] for i in sorted(self._terms)]

    def loss(self) -> torch.Tensor:
        """``first_multiplier·term_0 + Σ_{l>0} term_l``; a zero scalar when nothing was recorded."""
        if not self._terms:
            return torch.zeros((), device=self._device)
        total = 0
        for index in sorted(self._terms):
            weight = self.first_multiplier if index == 0 else 1.0
            total = total + weight * self._terms[index]
        return total

    def remove(self) -> None:
        """Detach every hook this object registered and forget the recorded terms. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._terms.clear()

    def __enter__(self) -> BNStatHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def bn_stat_distance(teacher: nn.Module, images: torch.Tensor) -> float:
    """Fidelity metric: ``L_bn`` of ``images`` (already normalised for ``teacher``) with ``first_multiplier=1``.

    The teacher is run in eval mode (its mode is restored afterwards) so its running statistics are not touched.
    Lower means the images' feature statistics are closer to the teacher's training data.
    """
    was_training = teacher.training
    teacher.eval()
    try:
        with BNStatHooks(teacher, first_multiplier=1.0) as bn:
            teacher(images)
            return float(bn.loss())
    finally:
        teacher.train(was_training)
