"""The prior interface (SPEC §5): per-sample conditioning (:class:`Cond`) and :class:`DiffusionPrior`, whose
``predict_noise`` applies classifier-free guidance and returns ε̂ whatever the network predicts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Short names of the schedulers guidance can use (variance-preserving): the one list that --help and the errors
# show. Any other diffusers scheduler class name is accepted too.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}
# model_index.json `_class_name` -> prior kind; unknown pipelines fall back to their component names.


class PriorLoadError(ValueError):
    """A prior that cannot be loaded or configured; the one-line message says what is wrong and what to do."""


@dataclass(eq=False)
class Cond:
    """Per-sample conditioning of one batch: what the model needs for both classifier-free guidance branches.

    ``uncond`` is the unconditional branch (null class ids ``(B,)`` or empty-prompt embeddings ``(B, L, D)``).
    ``cond`` is the conditional branch (the class, or SD's fixed class-free prompt), or ``None`` for an unconditional
    prior, which then makes a single call.
    """

    uncond: torch.Tensor
    cond: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.uncond.shape[0]

    @property
    def is_conditional(self) -> bool:
        return self.cond is not None

    def select_rows(self, rows: slice) -> Cond:
        """The conditioning of a contiguous range of the batch (a view, no index tensor)."""
        return Cond(self.uncond[rows], None if self.cond is None else self.cond[rows])

    def select(self, index: torch.Tensor) -> Cond:
        """The conditioning of a subset of the batch (``index``: long indices or a bool mask)."""
        index = index.to(self.uncond.device)
        return Cond(self.uncond[index], None if self.cond is None else self.cond[index])

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        if not conds:
            raise ValueError("Cond.cat needs at least one Cond")
        if len({c.is_conditional for c in conds}) > 1:
            raise ValueError("cannot concatenate class-conditional and class-free Cond objects")
        cond = torch.cat([c.cond for c in conds]) if conds[0].is_conditional else None
        return Cond(torch.cat([c.uncond for c in conds]), cond)

    def to(self, device: torch.device | str) -> Cond:
        return Cond(self.uncond.to(device), None if self.cond is None else self.cond.to(device))


def batch_timesteps(t: int | float | torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """A python number, 0-d tensor or ``(B,)`` tensor of timesteps -> a ``(B,)`` tensor on ``device``."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        return t.expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"timesteps of shape {tuple(t.shape)} do not match a batch of {batch_size}")
    return t


class DiffusionPrior(nn.Module):
    """A frozen pretrained diffusion model: ``condition`` -> ``predict_noise`` (CFG inside) -> ``decode``.

    Attributes: ``scheduler`` (a diffusers scheduler, consuming ε), ``latent_shape`` ``(C, H, W)`` of ``z``,
    ``image_channels`` and ``image_size`` of decoded images, ``is_latent``, ``class_conditional``, ``class_names``.
    ``z`` is the model input: schedulers whose ``scale_model_input`` is not the identity (Euler) need the caller to
    apply it before ``predict_noise``.
    """

    kind: str = "prior"
    is_latent: bool = False
    checkpointable: tuple[str, ...] = ()  # the diffusers networks the latent gradient flows back through

    def __init__(
        self,
        scheduler: Any,
        latent_shape: tuple[int, int, int],
        image_channels: int,
        image_size: int,
        class_names: Sequence[str],
        class_conditional: bool,
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise PriorLoadError(f"unsupported prediction_type '{prediction_type}' (epsilon, v_prediction, sample)")
        self.scheduler = scheduler
        self.latent_shape = tuple(int(d) for d in latent_shape)
        self.image_channels = int(image_channels)
        self.image_size = int(image_size)
        self.class_names = tuple(class_names)
        self.class_conditional = class_conditional
        self.prediction_type = prediction_type
        self.source = ""
        self.gradient_checkpointing = False

    # -- model-specific pieces ---------------------------------------------------------------------------------------
    def _set_class_ids(self, null_class: int, class_to_prior: Sequence[int] | None) -> None:
        """Class-id conditioning (pixel UNets, DiT): teacher class k -> prior id ``class_to_prior[k]``."""
        self.null_class = null_class
        ids = list(range(len(self.class_names))) if class_to_prior is None else list(class_to_prior)
        self.register_buffer("class_to_prior", torch.tensor(ids, dtype=torch.long), persistent=False)

    def _null_condition(self, batch_size: int) -> torch.Tensor:
        """Class-id priors' null class; text priors override this with the empty prompt."""
        return torch.full((batch_size,), self.null_class, dtype=torch.long, device=self.device)

    def _class_condition(self, class_ids: torch.Tensor) -> torch.Tensor:
        return self.class_to_prior[class_ids]

    def _model_output(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One batched network call; returns the prediction with ``z``'s channels (learned sigma dropped)."""
        raise NotImplementedError

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Latents -> images roughly in [0, 1], NOT clamped, differentiable w.r.t. ``z0``."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> ``z0`` (deterministic: the VAE posterior mean)."""
        raise NotImplementedError

    def decode_for_guidance(self, z0: torch.Tensor) -> torch.Tensor:
        """The decoder of x̂0 inside the guided step: ``decode`` unless a cheaper guidance decoder is set."""
        return self.decode(z0)

    # -- the shared path ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train(self, mode: bool = True) -> DiffusionPrior:
        return super().train(False)  # always eval: frozen weights, no label dropout

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing in the networks of ``checkpointable`` (the UNet or DiT, and the VAE, whose
        decoder the guidance gradient crosses): their blocks keep only their inputs in the forward pass and recompute
        the rest in the backward pass, about one more forward for much less activation memory. diffusers (0.42)
        checks ``torch.is_grad_enabled() and self.gradient_checkpointing``, not ``self.training``, so it acts in the
        eval-mode guidance step and not at all under ``no_grad`` (unguided steps, ε̂ recompute, decode). Cheap to
        call again with the same value."""
        if enabled == self.gradient_checkpointing:
            return
        networks = [getattr(self, name) for name in self.checkpointable]
        if getattr(self, "guidance_decoder", None) is not None:  # the decoder the gradient crosses instead of the VAE
            networks.append(self.guidance_decoder)
        for network in networks:
            if enabled:
                network.enable_gradient_checkpointing()
            else:
                network.disable_gradient_checkpointing()
        self.gradient_checkpointing = enabled

    def condition(self, class_ids: torch.Tensor | Sequence[int] | None, batch_size: int | None = None) -> Cond:
        """Conditioning for a batch of teacher class ids ``(B,)``; ``None`` (with ``batch_size``): unconditional."""
        if class_ids is None:
            if batch_size is None:
                raise ValueError("condition(None) needs batch_size")
            return Cond(self._null_condition(batch_size))
        class_ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
        # Once per batch, not per step: an out-of-range id would otherwise be a device-side assert on CUDA. Host ids
        # are checked on the host and copied over without a sync (the generation pool's case).
        ids = class_ids.tolist() if class_ids.device.type == "cpu" else [int(class_ids.min()), int(class_ids.max())]
        if ids and (min(ids) < 0 or max(ids) >= self.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.num_classes}), got {class_ids.tolist()}")
        class_ids = class_ids.to(self.device, non_blocking=True)
        if not self.class_conditional:
            return Cond(self._null_condition(len(class_ids)), self._fixed_condition(len(class_ids)))
        return Cond(self._null_condition(len(class_ids)), self._class_condition(class_ids))

    def _fixed_condition(self, batch_size: int) -> torch.Tensor | None:
        """The class-free conditional branch (one condition for every sample), or None: no CFG is possible."""
        return None

    def predict_noise(
        self, z: torch.Tensor, t: int | float | torch.Tensor, cond: Cond, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """ε̂(z_t, t) with classifier-free guidance ε̂ = ε̂_u + s·(ε̂_c − ε̂_u), differentiable w.r.t. ``z``.

        One network call: on ``[uncond; cond]`` (batch 2B) when the batch is conditional and ``s != 1``, on the
        conditional branch alone when ``s == 1``, on the single branch of an unconditional prior's ``cond``.
        """
        if len(cond) != z.shape[0]:
            raise ValueError(f"cond holds {len(cond)} samples, z holds {z.shape[0]}")
        t = batch_timesteps(t, z.shape[0], z.device)  # (B,)
        x = z.to(self.dtype)
        if cond.cond is None:
            out = self._model_output(x, t, cond.uncond)
        elif guidance_scale == 1.0:
            out = self._model_output(x, t, cond.cond)
        else:
            both = self._model_output(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond.uncond, cond.cond]))
            out_u, out_c = both.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)  # linear, so guiding v or x0 then converting is the same
        return self._to_epsilon(out.to(z.dtype), z, t)

    def _alphas_cumprod(self, device: torch.device) -> torch.Tensor:
        """ᾱ on ``device``, copied there once (not at every call: a blocking host-to-device copy)."""
        cached = getattr(self, "_alphas_on", None)
        if cached is None or cached.device != device:
            cached = self._alphas_on = self.scheduler.alphas_cumprod.to(device)
        return cached

    def _to_epsilon(self, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return out
        alpha_bar = self._alphas_cumprod(z.device)[t.round().long()].to(z.dtype).view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":  # v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0
            return alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * z
        return (z - alpha_bar.sqrt() * out) / (1 - alpha_bar).sqrt()  # x0-prediction

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, source={self.source!r}, latent_shape={self.latent_shape}, "
                f"image={self.image_channels}x{self.image_size}x{self.image_size}, classes={self.num_classes}, "
                f"class_conditional={self.class_conditional}, scheduler={type(self.scheduler).__name__}")


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


def _square(size: int | Sequence[int], what: str) -> int:
    if isinstance(size, int):
        return size
    if len(set(size)) != 1:
        raise PriorLoadError(f"{what} {tuple(size)} is not square; pass image_size")
    return int(size[0])


def _check_divisible(value: int, factor: int, what: str, by: str) -> None:
    if value % factor:
        raise PriorLoadError(f"{what} {value} is not divisible by {factor} ({by})")
