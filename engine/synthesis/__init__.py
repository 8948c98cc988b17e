"""Synthesis: the generators of the co-training loop behind one interface (:mod:`engine.synthesis.protocol`).

    guided.py         the teacher-guided diffusion sampler (one micro-batch, diffusers schedulers: offline synthesis)
    pool.py           the generation pool: every in-flight sample of the co-training loop in one latent tensor
    deepinversion.py  DeepInversion (pixels optimised from noise) and its pool
"""

from __future__ import annotations

import torch

from engine.synthesis.deepinversion import DeepInversionGenerator, DeepInversionPool
from engine.synthesis.guided import GuidedSampler
from engine.synthesis.pool import DiffusionPool
from engine.synthesis.protocol import Finished, GenerationPool

__all__ = ["DeepInversionPool", "DiffusionPool", "Finished", "GenerationPool", "make_pool"]


def make_pool(generator: GuidedSampler | DeepInversionGenerator, rng: torch.Generator) -> GenerationPool:
    """The pool the co-training loop advances for ``generator``; ``rng`` (on the generator's device) draws the
    pool's random numbers (CutMix, DDPM noise)."""
    if isinstance(generator, DeepInversionGenerator):
        return DeepInversionPool(generator)
    return DiffusionPool(generator, rng)
