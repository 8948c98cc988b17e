"""DeepInversion lives in :mod:`engine.synthesis.deepinversion`; this name keeps the old import path."""

from engine.synthesis.deepinversion import (  # noqa: F401
    DeepInversionConfig,
    DeepInversionGenerator,
    PixelBatch,
    image_prior_losses,
)
