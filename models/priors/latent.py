"""Latent priors behind a VAE: Stable Diffusion 1.x/2.x (text-conditioned) and class-conditional DiT."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.priors.interface import DiffusionPrior, PriorLoadError, _check_divisible, _frozen, _square


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
