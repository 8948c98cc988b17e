"""Pretrained diffusion priors behind one interface: ε̂ with classifier-free guidance, a differentiable decoder.

    prior = load_prior("models/weights/prior-digits", class_names=[str(k) for k in range(10)])
    cond = prior.condition(torch.tensor([3, 7]))            # per-sample conditioning, both CFG branches
    eps = prior.predict_noise(z_t, t, cond, guidance_scale=2.0)  # (B, C, H, W), ε̂ = ε̂_u + s·(ε̂_c − ε̂_u)
    x0 = prior.decode(z0)                                    # (B, image_channels, image_size, image_size), ≈[0, 1]

Three kinds (SPEC §5), detected from the folder or hub repo:

* ``PixelPrior``: a diffusers ``UNet2DModel`` in pixel space with ``num_class_embeds = K + 1`` (the last id is the
  null class of classifier-free guidance); the "latent" is the image in [-1, 1]. The default world's prior.
* ``StableDiffusionPrior``: SD 1.x/2.x (``UNet2DConditionModel`` + ``AutoencoderKL`` + CLIP text encoder); one prompt
  per class from a template, the empty prompt as the unconditional branch, or one fixed prompt (class-free mode).
* ``DiTPrior``: a class-conditional ``DiTTransformer2DModel`` + ``AutoencoderKL``; teacher classes are mapped to the
  prior's class ids (ImageNet for the public DiTs); the null class is ``num_embeds_ada_norm``.

Notation (SPEC §2): ``z`` latent (the image for pixel priors), ``t`` timestep, ``ε̂`` predicted noise, ``s`` guidance
scale, ``ᾱ_t`` = ``scheduler.alphas_cumprod[t]``. ``predict_noise`` always returns ε̂, whatever the model was trained
to predict (v- and x0-prediction are converted), so the prior's scheduler is built with ``prediction_type="epsilon"``.

The priors are frozen and stay in eval mode (``train()`` is a no-op): DiT's label embedding drops labels at random in
training mode, which would silently corrupt guidance.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

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
PIPELINE_KINDS = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "DiTPipeline": "dit",
    "DDPMPipeline": "pixel",
    "DDIMPipeline": "pixel",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class PriorLoadError(ValueError):
    """A prior that cannot be loaded or configured; the one-line message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------------------------------
# Conditioning


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


# ---------------------------------------------------------------------------------------------------------------------
# The interface


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
        ids = class_ids.tolist() if class_ids.device.type == "cpu" else None
        low, high = (min(ids, default=0), max(ids, default=0)) if ids is not None else \
            (int(class_ids.min()), int(class_ids.max())) if len(class_ids) else (0, 0)
        if low < 0 or high >= self.num_classes:
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

    def _to_epsilon(self, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return out
        alpha_bar = self.scheduler.alphas_cumprod.to(z.device)[t.round().long()].to(z.dtype).view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":  # v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0
            return alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * z
        return (z - alpha_bar.sqrt() * out) / (1 - alpha_bar).sqrt()  # x0-prediction

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, source={self.source!r}, latent_shape={self.latent_shape}, "
                f"image={self.image_channels}x{self.image_size}x{self.image_size}, classes={self.num_classes}, "
                f"class_conditional={self.class_conditional}, scheduler={type(self.scheduler).__name__}")


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


class PixelPrior(DiffusionPrior):
    """A pixel-space ``UNet2DModel``; class-conditional through ``num_class_embeds = K_prior + 1`` (null = last id).

    ``class_to_prior`` maps teacher class ids to the prior's class ids (identity for the default world).
    """

    kind = "pixel"
    is_latent = False
    checkpointable = ("unet",)

    def __init__(
        self,
        unet: nn.Module,
        scheduler: Any,
        class_names: Sequence[str],
        class_to_prior: Sequence[int] | None = None,
        image_size: int | None = None,
        prediction_type: str = "epsilon",
    ):
        config = unet.config
        size = image_size or _square(config.sample_size, "unet sample_size")
        _check_divisible(size, 2 ** (len(config.block_out_channels) - 1), "image_size", "the UNet's downsampling")
        conditional = config.num_class_embeds is not None
        super().__init__(scheduler, (config.in_channels, size, size), config.out_channels, size, class_names,
                         conditional, prediction_type)
        self.unet = _frozen(unet)
        self._set_class_ids(config.num_class_embeds - 1 if conditional else 0, class_to_prior)

    def _model_output(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t, class_labels=labels if self.class_conditional else None).sample

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        return (z0 + 1) / 2

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1


class LatentDiffusionPrior(DiffusionPrior):
    """The VAE path: ``decode(z) = (D(z / scale + shift) + 1) / 2``, ``encode(x) = (E(2x − 1).mean − shift)·scale``."""

    is_latent = True
    vae: nn.Module

    def _set_vae(self, vae: nn.Module) -> None:
        self.vae = _frozen(vae)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.guidance_decoder = None

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        z = z0.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return (self.vae.decode(z).sample.to(z0.dtype) + 1) / 2

    def set_guidance_decoder(self, decoder: nn.Module | None) -> None:
        """A cheap stand-in for the VAE decoder inside the guided step only: diffusers' ``AutoencoderTiny`` (TAESD).
        At 512 px the full decoder is ≈ 2.5 TFLOP per image forward, TAESD's ≈ 0.14 (benchmarks/flops.py), and
        the teacher sees x̂0 resized to its own 32 px anyway. Final images still come from ``decode``."""
        if decoder is not None and decoder.config.latent_channels != self.latent_shape[0]:
            raise PriorLoadError(f"the guidance decoder takes {decoder.config.latent_channels}-channel latents, the "
                                 f"prior makes {self.latent_shape[0]}; use a TAESD trained for this prior's VAE")
        self.guidance_decoder = None if decoder is None else _frozen(decoder)

    def decode_for_guidance(self, z0: torch.Tensor) -> torch.Tensor:
        if self.guidance_decoder is None:
            return self.decode(z0)
        # TAESD decodes the diffusion latents themselves (its scaling_factor is 1) to [-1, 1].
        tiny = self.guidance_decoder
        z = z0.to(tiny.dtype) / float(tiny.config.scaling_factor)
        return (tiny.decode(z).sample.to(z0.dtype) + 1) / 2

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        mean = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).to(images.dtype)

    def enable_vae_slicing(self) -> None:
        """Decode a batch one sample at a time inside the VAE (less peak memory for large images)."""
        self.vae.enable_slicing()


def vae_scale_factor(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


class StableDiffusionPrior(LatentDiffusionPrior):
    """Stable Diffusion 1.x/2.x. Prompt embeddings are computed once here; the text encoder is not kept.

    Class mode: prompt ``prompt_template.format(name)`` per class (underscores in names become spaces), the empty
    prompt as the unconditional branch. Class-free mode (``class_free_prompt``): every sample gets that one prompt,
    still guided against the empty prompt with scale ``s`` (DiffDFKD's DomainNet runs); ``class_conditional`` is then
    False (the prompt carries no class).
    """

    kind = "sd"
    checkpointable = ("unet", "vae")

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler: Any,
        class_names: Sequence[str],
        prompt_template: str = "a photo of a {}",
        class_free_prompt: str | None = None,
        image_size: int | None = None,
        prediction_type: str = "epsilon",
    ):
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise PriorLoadError("SDXL-style UNets (addition_embed_type) are not supported; use an SD 1.x/2.x folder")
        factor = vae_scale_factor(vae)
        latent = _square(unet.config.sample_size, "unet sample_size")
        if image_size is not None:
            _check_divisible(image_size, factor, "image_size", "the VAE's downsampling")
            latent = image_size // factor
        unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
        _check_divisible(latent, unet_factor, "latent size", "the UNet's downsampling")
        super().__init__(scheduler, (unet.config.in_channels, latent, latent), vae.config.out_channels,
                         latent * factor, class_names, class_free_prompt is None, prediction_type)
        self.unet = _frozen(unet)
        self._set_vae(vae)
        if class_free_prompt is None:
            self.prompts = tuple(prompt_template.format(name.replace("_", " ")) for name in class_names)
        else:
            self.prompts = (class_free_prompt,)
        # The unconditional branch is the empty prompt, in class mode and in class-free mode alike.
        embeddings = encode_prompts(text_encoder, tokenizer, ["", *self.prompts]).to(self.dtype)  # (1 + P, L, D)
        self.register_buffer("null_embedding", embeddings[:1], persistent=False)  # (1, L, D)
        self.register_buffer("class_embeddings", embeddings[1:], persistent=False)  # (P, L, D)

    def _null_condition(self, batch_size: int) -> torch.Tensor:
        return self.null_embedding.expand(batch_size, -1, -1)  # a view: the sampler selects/concatenates, which copies

    def _fixed_condition(self, batch_size: int) -> torch.Tensor | None:
        # Class-free mode guides between the fixed prompt and the empty prompt, like the SD pipeline does.
        return None if self.class_conditional else self.class_embeddings.expand(batch_size, -1, -1)

    def _class_condition(self, class_ids: torch.Tensor) -> torch.Tensor:
        return self.class_embeddings[class_ids]

    def _model_output(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t, encoder_hidden_states=labels).sample


@torch.no_grad()
def encode_prompts(text_encoder: nn.Module, tokenizer: Any, prompts: Sequence[str], chunk: int = 64) -> torch.Tensor:
    """CLIP last hidden states ``(N, L, D)``, prompts padded to the tokenizer's max length (as the SD pipeline)."""
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
    device = next(text_encoder.parameters()).device
    out = []
    for start in range(0, len(prompts), chunk):
        tokens = tokenizer(list(prompts[start:start + chunk]), padding="max_length", truncation=True,
                           max_length=tokenizer.model_max_length, return_tensors="pt")
        mask = tokens.attention_mask.to(device) if use_mask else None
        out.append(text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0])
    return torch.cat(out)


class DiTPrior(LatentDiffusionPrior):
    """Class-conditional DiT in a VAE latent space; the null class is ``num_embeds_ada_norm`` (DiT's CFG id).

    DiT predicts a learned variance next to ε (``out_channels = 2·in_channels``): the first half is ε̂, as in
    diffusers' ``DiTPipeline``. Unlike that pipeline, guidance applies to every latent channel.
    """

    kind = "dit"
    checkpointable = ("transformer", "vae")

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        scheduler: Any,
        class_names: Sequence[str],
        class_to_prior: Sequence[int] | None = None,
        image_size: int | None = None,
        prediction_type: str = "epsilon",
    ):
        config = transformer.config
        factor = vae_scale_factor(vae)
        latent = config.sample_size
        if image_size is not None:
            _check_divisible(image_size, factor, "image_size", "the VAE's downsampling")
            latent = image_size // factor
        _check_divisible(latent, config.patch_size, "latent size", "the DiT patch size")
        super().__init__(scheduler, (config.in_channels, latent, latent), vae.config.out_channels, latent * factor,
                         class_names, True, prediction_type)
        self.transformer = _frozen(transformer)
        self._set_vae(vae)
        self._set_class_ids(int(config.num_embeds_ada_norm), class_to_prior)

    def _model_output(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.transformer(z, timestep=t, class_labels=labels).sample  # (B, 2C, H, W) with learned sigma
        channels = z.shape[1]
        return out[:, :channels] if out.shape[1] == 2 * channels else out


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_prior(
    spec: str | os.PathLike,
    class_names: Sequence[str],
    *,
    scheduler: str = "ddim",
    class_map: Mapping[int | str, int | str] | Sequence[int | str] | None = None,
    prompt_template: str = "a photo of a {}",
    class_free_prompt: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    local_files_only: bool | None = None,
    image_size: int | None = None,
    device: torch.device | str = "cpu",
    guidance_decoder: str | os.PathLike | None = None,
) -> DiffusionPrior:
    """Load a prior from a local diffusers folder or a hub id, its kind detected (``detect_prior_kind``).

    ``class_names`` are the teacher's classes (prompts for SD; matched by name to the prior's labels for pixel/DiT
    priors when the folder names them). ``class_map``: teacher class (index or name) -> prior class id (or label), a
    dict or a list; required for pixel/DiT priors whose classes are not the teacher's. ``scheduler``: a short name
    (``SCHEDULERS``) or a diffusers scheduler class name, built from the saved scheduler config. ``local_files_only``
    defaults to ``HF_HUB_OFFLINE`` read at call time. ``image_size`` overrides the resolution the prior samples at
    (a warning when below the one it was trained at). ``guidance_decoder``: a folder or hub id of a diffusers
    ``AutoencoderTiny`` (TAESD) for x̂0 inside the guided step of a latent prior (``set_guidance_decoder``).
    ``torch_dtype`` applies to every network, the text encoder and the guidance decoder included.
    """
    from diffusers import DDPMScheduler

    if not class_names:
        raise PriorLoadError("class_names is empty: pass the teacher's class names")
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    source = _resolve_source(spec)
    kind, index = detect_prior_kind(source, local_files_only=local_files_only)
    if class_map is not None and kind == "sd":
        raise PriorLoadError("class_map applies to class-id priors (pixel, DiT); SD priors take prompts per class")
    hub = {"local_files_only": local_files_only}
    weights = {"torch_dtype": torch_dtype, **hub}
    scheduler_config = dict(_from_pretrained(DDPMScheduler.load_config, source, "scheduler", **hub))
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    noise_scheduler = build_scheduler(scheduler, scheduler_config)

    if kind == "pixel":
        from diffusers import UNet2DModel

        unet = _from_pretrained(UNet2DModel.from_pretrained, source, "unet", **weights)
        embeds = unet.config.num_class_embeds
        class_to_prior = None
        if embeds is not None:  # the last class embedding is the null class
            class_to_prior = resolve_class_map(class_names, class_map, embeds - 1, _prior_labels(source, index))
        prior = PixelPrior(unet, noise_scheduler, class_names, class_to_prior, image_size, prediction_type)
    elif kind == "sd":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        unet = _from_pretrained(UNet2DConditionModel.from_pretrained, source, "unet", **weights)
        vae = _from_pretrained(AutoencoderKL.from_pretrained, source, "vae", **weights)
        tokenizer = _from_pretrained(CLIPTokenizer.from_pretrained, source, "tokenizer", **hub)
        # The text encoder runs once here, in torch_dtype, and is not kept: prompts are fixed per class.
        text_encoder = _frozen(_from_pretrained(CLIPTextModel.from_pretrained, source, "text_encoder", **weights))
        prior = StableDiffusionPrior(unet, vae, text_encoder.to(device), tokenizer, noise_scheduler, class_names,
                                     prompt_template, class_free_prompt, image_size, prediction_type)
        del text_encoder
    else:
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        transformer = _from_pretrained(DiTTransformer2DModel.from_pretrained, source, "transformer", **weights)
        vae = _from_pretrained(AutoencoderKL.from_pretrained, source, "vae", **weights)
        num_prior = transformer.config.num_embeds_ada_norm
        class_to_prior = resolve_class_map(class_names, class_map, num_prior, _prior_labels(source, index))
        prior = DiTPrior(transformer, vae, noise_scheduler, class_names, class_to_prior, image_size, prediction_type)
    if class_free_prompt is not None and kind != "sd":
        log.warning("class_free_prompt only applies to Stable Diffusion priors; ignored for a %s prior", kind)
    prior.source = str(spec)
    denoiser = prior.transformer if kind == "dit" else prior.unet
    factor = vae_scale_factor(prior.vae) if prior.is_latent else 1
    native = _square(denoiser.config.sample_size, "sample_size") * factor
    if image_size is not None and image_size < native:
        log.warning("sampling the %s prior at %d px, below the %d px it was trained at: its images may degrade "
                    "(fewer details, broken layouts)", kind, image_size, native)
    if guidance_decoder is not None:
        if not prior.is_latent:
            raise PriorLoadError("a guidance decoder applies to latent priors (SD, DiT); a pixel prior has no decoder")
        prior.set_guidance_decoder(load_guidance_decoder(guidance_decoder, torch_dtype, local_files_only))
    prior.to(device=device, dtype=torch_dtype)
    prior.requires_grad_(False).eval()
    log.info("loaded %s prior from %s: latent %s, images %dx%dx%d, scheduler %s", kind, spec, prior.latent_shape,
             prior.image_channels, prior.image_size, prior.image_size, type(noise_scheduler).__name__)
    return prior


def load_guidance_decoder(
    spec: str | os.PathLike, torch_dtype: torch.dtype = torch.float32, local_files_only: bool = False
) -> nn.Module:
    """A diffusers ``AutoencoderTiny`` (TAESD; the hub's ``madebyollin/taesd`` fits SD 1.x/2.x and DiT latents) from
    a folder (its config.json at the top or in ``vae/``) or a hub id."""
    from diffusers import AutoencoderTiny

    try:
        source = _resolve_source(spec)
    except PriorLoadError:
        raise PriorLoadError(f"guidance decoder {spec}: not a folder or hub id of an AutoencoderTiny") from None
    top = not isinstance(source, Path) or (source / "config.json").is_file() or not (source / "vae").is_dir()
    try:
        return AutoencoderTiny.from_pretrained(str(source), subfolder=None if top else "vae", torch_dtype=torch_dtype,
                                               local_files_only=local_files_only)
    except Exception as err:  # hub, file and config errors come in many types
        if isinstance(source, str):
            raise _hub_error(source, err, local_files_only) from err
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise PriorLoadError(f"cannot load the guidance decoder (AutoencoderTiny) from {source}: "
                             f"{type(err).__name__}: {reason}") from err


def build_scheduler(name: str, config: Mapping[str, Any]) -> Any:
    """A diffusers scheduler by short name or class name, built from a saved config, consuming ε (see module doc)."""
    import inspect

    import diffusers

    class_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise PriorLoadError(f"unknown scheduler '{name}': use {', '.join(SCHEDULERS)} or a diffusers scheduler class")
    # predict_noise always returns ε (v- and x0-predictions are converted), so the scheduler must consume ε.
    takes_prediction_type = "prediction_type" in inspect.signature(cls.__init__).parameters
    return cls.from_config(dict(config), **({"prediction_type": "epsilon"} if takes_prediction_type else {}))


def detect_prior_kind(source: str | Path, local_files_only: bool = False) -> tuple[str, dict[str, Any]]:
    """``("pixel" | "sd" | "dit", model_index)`` from model_index.json's ``_class_name`` or which components exist."""
    index = _read_json(source, "model_index.json", local_files_only)
    if index is not None and index.get("_class_name") in PIPELINE_KINDS:
        return PIPELINE_KINDS[index["_class_name"]], index
    if index is not None:
        components = set(index)
    elif isinstance(source, Path):
        components = {p.name for p in source.iterdir() if p.is_dir()}
    elif _read_json(source, "unet/config.json", local_files_only) is not None:  # a hub repo without model_index.json
        components = {"unet"}
    else:
        components = set()
    if "transformer" in components:
        return "dit", index or {}
    if {"unet", "vae", "text_encoder"} <= components:
        return "sd", index or {}
    if "unet" in components:
        return "pixel", index or {}
    raise PriorLoadError(f"{source} is not a diffusers prior: expected transformer/ (DiT), unet/+vae/+text_encoder/ "
                         "(Stable Diffusion) or unet/ (pixel), or a model_index.json naming them")


def resolve_class_map(
    class_names: Sequence[str],
    class_map: Mapping[int | str, int | str] | Sequence[int | str] | None,
    num_prior_classes: int,
    prior_labels: Mapping[str, int] | None = None,
) -> list[int]:
    """Teacher class index -> prior class id, for class-id priors (pixel, DiT).

    In order: the explicit ``class_map`` (keys: teacher index or name; values: prior id or prior label); else by
    name when the prior names its classes and every teacher name is one of them; else the identity when both have
    the same number of classes; else an error asking for ``class_map``.
    """
    labels = {_normalise(k): v for k, v in (prior_labels or {}).items()}
    if class_map is None:
        if labels and all(_normalise(n) in labels for n in class_names):
            return [labels[_normalise(n)] for n in class_names]
        if len(class_names) == num_prior_classes:
            if labels:
                log.warning("teacher class names do not match the prior's labels; assuming class i = prior class i")
            return list(range(len(class_names)))
        raise PriorLoadError(f"the prior has {num_prior_classes} classes and the teacher {len(class_names)}: pass "
                             'class_map (teacher class index or name -> prior class id), e.g. {"0": 404, "1": 817}')
    if isinstance(class_map, Mapping):  # JSON keys are strings: "3" is teacher class 3 unless a class is named "3"
        by_key = {(class_names.index(k) if k in class_names else int(k) if str(k).isdigit() else k): v
                  for k, v in class_map.items()}
        missing = [n for i, n in enumerate(class_names) if i not in by_key]
        if missing:
            raise PriorLoadError(f"class_map has no prior class for teacher classes {missing}")
        values = [by_key[i] for i in range(len(class_names))]
    else:
        values = list(class_map)
        if len(values) != len(class_names):
            raise PriorLoadError(f"class_map lists {len(values)} prior ids for {len(class_names)} teacher classes")
    ids = []
    for value in values:
        if isinstance(value, str):
            if _normalise(value) not in labels:
                raise PriorLoadError(f"class_map value '{value}' is not one of the prior's class labels")
            value = labels[_normalise(value)]
        if not 0 <= int(value) < num_prior_classes:
            raise PriorLoadError(f"class_map id {value} is outside the prior's classes [0, {num_prior_classes})")
        ids.append(int(value))
    return ids


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def _prior_labels(source: str | Path, index: Mapping[str, Any]) -> dict[str, int] | None:
    """The prior's class names: DiT's ``id2label`` in model_index.json (comma-separated synonyms), or the
    ``class_names`` of the default world's ``provenance.json``."""
    if index.get("id2label"):
        return {label: int(k) for k, value in index["id2label"].items() for label in value.split(",") if label.strip()}
    provenance = _read_json(source, "provenance.json", local_files_only=True) if isinstance(source, Path) else None
    if provenance and provenance.get("class_names"):
        return {name: i for i, name in enumerate(provenance["class_names"])}
    return None


def _resolve_source(spec: str | os.PathLike) -> str | Path:
    """A local folder (``Path``) or a hub id (``str``); a path-like spec that does not exist is an error."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PriorLoadError(f"prior {spec} is a file; pass the diffusers folder (unet/, scheduler/, ...)")
    text = str(spec)
    if isinstance(spec, os.PathLike) or text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise PriorLoadError(f"prior folder not found: {path}")
    return text


def _hub_error(repo: str, err: BaseException, local_files_only: bool) -> PriorLoadError:
    """One line: which id failed and why, and the two ways out (a local folder, or fixing hub access)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(err, LocalEntryNotFoundError) and local_files_only:  # HF_HUB_OFFLINE and not in the cache
        return PriorLoadError(f"could not load hub id '{repo}': no local folder of that name and not in the Hugging "
                              "Face cache, and HF_HUB_OFFLINE is set; pass a local folder (save_pretrained layout), "
                              "or unset HF_HUB_OFFLINE where the network is reachable")
    if isinstance(err, LocalEntryNotFoundError):  # what huggingface_hub raises when the Hub cannot be reached
        return PriorLoadError(f"could not load hub id '{repo}': no local folder of that name, not in the Hugging Face "
                              "cache, and the Hub could not be reached; pass a local folder (save_pretrained layout), "
                              "or check the network")
    reason = (str(err).strip().splitlines() or [""])[0][:160]
    return PriorLoadError(f"could not load hub id '{repo}' ({type(err).__name__}: {reason}); pass a local folder "
                          "(save_pretrained layout), or set HF_HUB_OFFLINE=1 to use the local cache, or check the "
                          "network")


def _from_pretrained(loader, source: str | Path, subfolder: str, **kwargs) -> Any:
    """``loader(source, subfolder=...)`` (a ``from_pretrained``/``load_config``) with one-line ``PriorLoadError``s."""
    what = getattr(loader, "__self__", loader).__name__
    if isinstance(source, Path) and not (source / subfolder).is_dir():
        raise PriorLoadError(f"prior folder {source} has no {subfolder}/ (the {what})")
    try:
        return loader(str(source), subfolder=subfolder, **kwargs)
    except Exception as err:  # hub, network, file and config errors come in many types
        if isinstance(source, str):
            raise _hub_error(source, err, kwargs.get("local_files_only", False)) from err
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        message = f"cannot load the {what} from {source / subfolder}: {type(err).__name__}: {reason}"
        raise PriorLoadError(message) from err


def _read_json(source: str | Path, filename: str, local_files_only: bool) -> dict[str, Any] | None:
    """A JSON object of the folder or hub repo, ``None`` when the file does not exist there."""
    if isinstance(source, Path):
        path = source / filename
        if not path.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            path = Path(hf_hub_download(source, filename, local_files_only=local_files_only))
        except LocalEntryNotFoundError as err:  # offline or unreachable, not cached: "absent" is unknowable
            raise _hub_error(source, err, local_files_only) from err
        except EntryNotFoundError:
            return None
        except Exception as err:  # unknown repo, network down, ...
            raise _hub_error(source, err, local_files_only) from err
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PriorLoadError(f"cannot read {path} ({type(err).__name__}: {err}); fix or delete it") from None
    if not isinstance(value, dict):
        raise PriorLoadError(f"{path} is not a JSON object (it holds a {type(value).__name__}); fix or delete it")
    return value


def _square(size: int | Sequence[int], what: str) -> int:
    if isinstance(size, int):
        return size
    if len(set(size)) != 1:
        raise PriorLoadError(f"{what} {tuple(size)} is not square; pass image_size")
    return int(size[0])


def _check_divisible(value: int, factor: int, what: str, by: str) -> None:
    if value % factor:
        raise PriorLoadError(f"{what} {value} is not divisible by {factor} ({by})")
