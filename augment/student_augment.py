"""Standard student augmentation for KD (SPEC §3): random crop with zero padding, optional horizontal flip.

Works on a whole batch on its device, one random offset per sample drawn there (``generator`` lives on the images'
device), so it adds no host round trip to a KD step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad by ``pad`` pixels with zeros and crop back to the input size at a random offset per sample."""
    if pad == 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]  # (B, C, H, W)


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def student_augment(images: torch.Tensor, pad: int = 2, flip: bool = False, generator=None) -> torch.Tensor:
    """Crop (and flip, for datasets where mirror images keep their class — not digits)."""
    images = random_crop(images, pad, generator)
    return random_flip(images, generator) if flip else images
