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

# Split by concern: interface.py (Cond, DiffusionPrior), pixel.py, latent.py (SD, DiT), loading.py (load_prior & co).
from models.priors.interface import SCHEDULERS, Cond, DiffusionPrior, PriorLoadError, batch_timesteps
from models.priors.latent import (
    DiTPrior,
    LatentDiffusionPrior,
    StableDiffusionPrior,
    encode_prompts,
    vae_scale_factor,
)
from models.priors.loading import (
    PIPELINE_KINDS,
    _hub_error,
    build_scheduler,
    detect_prior_kind,
    load_guidance_decoder,
    load_prior,
    resolve_class_map,
)
from models.priors.pixel import PixelPrior

__all__ = ["PIPELINE_KINDS", "SCHEDULERS", "Cond", "DiTPrior", "DiffusionPrior", "LatentDiffusionPrior", "PixelPrior",
           "PriorLoadError", "StableDiffusionPrior", "batch_timesteps", "build_scheduler", "detect_prior_kind",
           "encode_prompts", "load_guidance_decoder", "load_prior", "resolve_class_map", "vae_scale_factor",
           "_hub_error"]
