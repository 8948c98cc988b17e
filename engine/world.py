"""Resolve a config into the objects a run needs: teacher, student, prior, generator, real test set.

Every user mistake found here becomes a one-line :class:`UserError` (exit 2) before anything is written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from torch import nn

from engine.classifiers import DEFAULT_PRIOR, ClassifierSpec, resolve_classifier
from engine.config import RunConfig
from engine.datasets import DatasetInfo, load_dataset
from engine.deepinversion import DeepInversionGenerator
from engine.errors import UserError
from engine.sampler import GuidanceConfig, GuidedSampler, TeacherView
from models.base import has_batchnorm

log = logging.getLogger(__name__)


@dataclass
class World:
    teacher: ClassifierSpec
    student: nn.Module
    info: DatasetInfo
    test_set: torch.utils.data.Dataset
    view: TeacherView
    generator: GuidedSampler | DeepInversionGenerator | None  # None for real-data KD
    prior: object | None = None


def guidance_config(cfg: RunConfig) -> GuidanceConfig:
    return GuidanceConfig(
        bn=cfg.bn, cls=cfg.cls, adv=0.0, step_size=cfg.step_size, guidance_scale=cfg.guidance_scale,
        steps=cfg.sampler_steps, grad_mode=cfg.grad_mode, recompute_eps=not cfg.reuse_eps,
        guide_every=cfg.guide_every, max_step_rms=cfg.max_step_rms, first_bn_multiplier=cfg.first_bn_multiplier,
        divergence=cfg.divergence,
        cutmix_every=cfg.cutmix_every, cutmix_beta=cfg.cutmix_beta, cutmix_prob=cfg.cutmix_prob,
        repair_steps=cfg.repair_steps, repair_band=cfg.repair_band,
        grad_chunk=cfg.grad_chunk, grad_checkpointing=cfg.grad_checkpointing,
    )


def load_run_prior(cfg: RunConfig, info: DatasetInfo, device: torch.device):
    from models.priors import PriorLoadError, load_prior

    spec = str(DEFAULT_PRIOR) if cfg.prior == "default" else cfg.prior
    class_map = json.loads(cfg.class_map) if cfg.class_map else None
    try:
        prior = load_prior(spec, info.class_names, scheduler=cfg.scheduler, class_map=class_map,
                           prompt_template=cfg.prompt_template, class_free_prompt=cfg.class_free_prompt or None)
    except PriorLoadError as err:
        raise UserError(str(err)) from None
    return prior.to(device)


def load_teacher(cfg: RunConfig, info: DatasetInfo, device: torch.device) -> tuple[ClassifierSpec, TeacherView]:
    """The frozen teacher and the view that maps images in [0, 1] to its input. Without BatchNorm layers the
    BN-statistics term is switched off (``cfg.bn = 0``) with a warning."""
    teacher = resolve_classifier(cfg.teacher, info, cfg.teacher_arch or None)
    if teacher.checkpoint is None:
        raise UserError(f"--teacher '{cfg.teacher}' is an untrained architecture; pass a trained checkpoint")
    teacher.model.to(device).eval().requires_grad_(False)
    if cfg.bn > 0 and not has_batchnorm(teacher.model):
        log.warning("the teacher has no BatchNorm layers: the BN-statistics term is disabled (--bn 0)")
        cfg.bn = 0.0
    size = teacher.provenance.get("image_size", info.image_size)
    channels = teacher.provenance.get("in_channels", info.channels)
    return teacher, TeacherView(size, channels, teacher.mean, teacher.std).to(device)


def guided_sampler(cfg: RunConfig, info: DatasetInfo, teacher: ClassifierSpec, view: TeacherView,
                   device: torch.device) -> GuidedSampler:
    """The configured prior steered by the teacher; a prior under half the teacher's resolution is refused."""
    prior = load_run_prior(cfg, info, device)
    if prior.image_size * 2 < view.size:
        raise UserError(f"the prior makes {prior.image_size}px images but the teacher needs {view.size}px; "
                        "use a prior of at least half the teacher's resolution")
    try:
        return GuidedSampler(prior, teacher.model, view, info.num_classes, guidance_config(cfg))
    except ValueError as err:
        raise UserError(f"--scheduler {cfg.scheduler}: {err}") from None


def build_world(cfg: RunConfig, device: torch.device) -> World:
    test_set, info = load_dataset(cfg.dataset, "test", root=cfg.data_root or None)
    teacher, view = load_teacher(cfg, info, device)
    student = resolve_classifier(cfg.student, info).model.to(device)
    generator, prior = None, None
    if cfg.method in ("diffdfkd", "dmkd"):
        generator = guided_sampler(cfg, info, teacher, view, device)
        prior = generator.prior
    elif cfg.method == "deepinv":
        generator = DeepInversionGenerator(teacher.model, view, info.num_classes, bn=10.0 * (cfg.bn > 0),
                                           cls=1.0 * (cfg.cls > 0), adv=cfg.adv, steps=cfg.deepinv_iters,
                                           lr=cfg.deepinv_lr, divergence=cfg.divergence,
                                           first_bn_multiplier=cfg.first_bn_multiplier)
    return World(teacher, student, info, test_set, view, generator, prior)
