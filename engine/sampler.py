"""The teacher-guided sampler lives in :mod:`engine.synthesis.guided`; this name keeps the old import path."""

from engine.synthesis.guided import (  # noqa: F401
    GenerationBatch,
    GuidanceConfig,
    GuidedSampler,
    SeamRepair,
    TeacherView,
    alpha_bar,
    straight_through_clamp,
)
