"""Pixel-space priors: a diffusers ``UNet2DModel`` whose "latent" is the image in [-1, 1] (the default world)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.priors.interface import DiffusionPrior, _check_divisible, _frozen, _square


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
