"""Resolve a config into the objects a run needs: teacher, student, prior, generator, real test set.

Every user mistake found here becomes a one-line :class:`UserError` (exit 2) before anything is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from engine.classifiers import PRIORS, ClassifierSpec, resolve_classifier
from engine.config import RunConfig, parse_class_map
from engine.datasets import DatasetInfo, load_dataset
from engine.errors import UserError
from engine.synthesis.deepinversion import DeepInversionConfig, DeepInversionGenerator
from engine.synthesis.guided import GuidanceConfig, GuidedSampler, TeacherView
from engine.synthesis.pool import step_tables
from losses import msarc_loss
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
    real_train: torch.utils.data.Dataset | None = None  # real-data KD's images (--real-split), loaded up front


def real_train_set(cfg: RunConfig) -> torch.utils.data.Dataset:
    """The real images ``--method real-kd`` distils on: ``--real-split`` of ``--dataset`` (the teacher's data)."""
    return load_dataset(cfg.dataset, cfg.real_split, root=cfg.data_root or None)[0]


def guidance_config(cfg: RunConfig, device: torch.device | str = "cpu") -> GuidanceConfig:
    guided_pass = cfg.guided_pass
    if guided_pass == "auto":  # one big graph pays on a GPU; on CPU the per-micro-batch graphs are faster
        guided_pass = "pool" if torch.device(device).type == "cuda" else "micro-batch"
    return GuidanceConfig(
        bn=cfg.bn, cls=cfg.cls, cls_boundary=cfg.cls_boundary, adv=0.0, step_size=cfg.step_size,
        guidance_ramp=cfg.guidance_ramp, guidance_scale=cfg.guidance_scale,
        steps=cfg.sampler_steps, grad_mode=cfg.grad_mode, recompute_eps=not cfg.reuse_eps,
        guide_every=cfg.guide_every, max_step_rms=cfg.max_step_rms, first_bn_multiplier=cfg.first_bn_multiplier,
        divergence=cfg.divergence,
        cutmix_every=cfg.cutmix_every, cutmix_beta=cfg.cutmix_beta, cutmix_prob=cfg.cutmix_prob,
        repair_steps=cfg.repair_steps, repair_band=cfg.repair_band,
        grad_chunk=cfg.grad_chunk, guided_pass=guided_pass, grad_checkpointing=cfg.grad_checkpointing,
    )


def frozen_dtype(device: torch.device | str, mixed_precision: str) -> torch.dtype:
    """The dtype the frozen networks (prior, VAE, text encoder, guidance decoder, teacher) are stored in: bf16 when
    the run computes in bf16 on CUDA, so autocast does not re-cast every frozen weight on every call; float32
    otherwise (CPU; fp16, whose autocast keeps fp32 weights: SD's VAE overflows in fp16). Latents and the latent
    gradient stay float32 either way (the prior adapters cast at their inputs and outputs)."""
    if torch.device(device).type == "cuda" and mixed_precision in ("auto", "bf16"):  # auto = bf16 on CUDA
        return torch.bfloat16
    return torch.float32


def deepinversion_config(cfg: RunConfig) -> DeepInversionConfig:
    return DeepInversionConfig(
        bn=cfg.deepinv_bn, cls=cfg.deepinv_cls, adv=0.0, tv_l1=cfg.deepinv_tv_l1, tv_l2=cfg.deepinv_tv_l2,
        l2=cfg.deepinv_l2, first_bn_multiplier=cfg.deepinv_first_bn_multiplier, jitter=cfg.deepinv_jitter,
        flip=cfg.aug_flip, steps=cfg.deepinv_iters, lr=cfg.deepinv_lr, divergence=cfg.divergence)


def load_run_prior(cfg: RunConfig, info: DatasetInfo, device: torch.device):
    from models.priors import PriorLoadError, load_prior

    spec = str(PRIORS.get(cfg.prior, cfg.prior))  # a committed prior's name, or a folder / hub id
    class_map = parse_class_map(cfg.class_map) if cfg.class_map else None
    guidance_decoder = cfg.guidance_decoder_path if cfg.guidance_decoder == "tiny" else None
    try:
        prior = load_prior(spec, info.class_names, scheduler=cfg.scheduler, class_map=class_map,
                           prompt_template=cfg.prompt_template, class_free_prompt=cfg.class_free_prompt or None,
                           torch_dtype=frozen_dtype(device, cfg.mixed_precision),
                           image_size=cfg.prior_resolution or None, device=device, guidance_decoder=guidance_decoder)
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
    store_frozen(teacher.model, frozen_dtype(device, cfg.mixed_precision))
    if (cfg.bn > 0 or cfg.deepinv_bn > 0) and not has_batchnorm(teacher.model):
        log.warning("the teacher has no BatchNorm layers: the BN-statistics term is disabled (--bn 0)")
        cfg.bn = cfg.deepinv_bn = 0.0
    size = teacher.provenance.get("image_size", info.image_size)
    channels = teacher.provenance.get("in_channels", info.channels)
    return teacher, TeacherView(size, channels, teacher.mean, teacher.std).to(device)


def store_frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen classifier's weights in ``dtype`` (no-op for float32). BatchNorm layers stay float32: their running
    statistics are L_bn's targets. Hooks cast floating inputs to ``dtype`` and outputs (logits, features) back to
    float32, so callers outside autocast work and cached logits (replay buffer, labels.pt) stay float32."""
    if dtype == torch.float32:
        return model
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.float()

    def cast(x, to: torch.dtype):
        if torch.is_tensor(x):
            return x.to(to) if x.is_floating_point() else x
        return type(x)(cast(v, to) for v in x) if isinstance(x, (tuple, list)) else x

    model.register_forward_pre_hook(lambda _, args: cast(args, dtype))
    model.register_forward_hook(lambda _, __, out: cast(out, torch.float32))
    return model


def speed_up(cfg: RunConfig, device: torch.device, prior, teacher: nn.Module, student: nn.Module) -> None:
    """CUDA: channels_last for the conv nets (cuDNN's bf16 tensor-core convolutions run NHWC; NCHW weights pay
    transposes). ``--compile``: torch.compile of the prior's UNet/DiT and the student, in place, so parameter names
    (checkpoints, the student snapshot) do not change. Neither changes a counted FLOP (benchmarks/flops.py); on a
    GPU both are to be measured (BENCHMARKS.md)."""
    if device.type == "cuda" and cfg.channels_last:
        for net in (prior, teacher, student):
            if net is not None:
                net.to(memory_format=torch.channels_last)
    if cfg.compile:
        if prior is not None:
            (prior.transformer if hasattr(prior, "transformer") else prior.unet).compile()
        student.compile()


def guided_sampler(cfg: RunConfig, info: DatasetInfo, teacher: ClassifierSpec, view: TeacherView,
                   device: torch.device) -> GuidedSampler:
    """The configured prior steered by the teacher; a prior under half the teacher's resolution is refused."""
    prior = load_run_prior(cfg, info, device)
    if prior.image_size * 2 < view.size:
        raise UserError(f"the prior makes {prior.image_size}px images but the teacher needs {view.size}px; "
                        "use a prior of at least half the teacher's resolution")
    try:
        return GuidedSampler(prior, teacher.model, view, info.num_classes, guidance_config(cfg, device))
    except ValueError as err:
        raise UserError(f"--scheduler {cfg.scheduler}: {err}") from None


def check_pool_scheduler(cfg: RunConfig, sampler: GuidedSampler) -> None:
    """The co-training loop's generation pool writes DDIM and DDPM updates out itself (engine/synthesis/pool.py)."""
    try:
        step_tables(sampler.prior.scheduler, cfg.sampler_steps, "cpu")
    except ValueError as err:
        raise UserError(f"--scheduler {cfg.scheduler}: {err}") from None


def check_buffer_fits(cfg: RunConfig, info: DatasetInfo, view: TeacherView, device: torch.device) -> None:
    """The replay buffer is allocated whole at the start: refuse one larger than the device's memory (ranks on one
    machine share its RAM, so the whole buffer is compared)."""
    per_image = view.channels * view.size**2 + 2 * 4 * info.num_classes + 8  # uint8 image, logits, targets, seed
    need = cfg.buffer_capacity * per_image
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, str(device)
    else:
        have, where = psutil.virtual_memory().total, "this machine"
    if need > have:
        raise UserError(f"the replay buffer of {cfg.buffer_capacity:,} images of {view.channels}x{view.size}x"
                        f"{view.size} would need {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of "
                        f"{where}; lower --images or --buffer-capacity")


def check_forward(cfg: RunConfig, teacher: ClassifierSpec, student: nn.Module, info: DatasetInfo,
                  view: TeacherView, device: torch.device) -> None:
    """A dry forward of teacher and student (and mSARC, which needs both models' stage maps and heads) on one dummy
    batch of the teacher's input, so that models that cannot take the data fail here, before anything is written."""
    shape = (view.channels, view.size, view.size)
    if (info.channels, info.image_size) != shape[:2]:
        raise UserError(f"dataset '{info.name}' has {info.channels}x{info.image_size}x{info.image_size} images but "
                        f"the teacher takes {'x'.join(map(str, shape))}; pass the dataset the teacher was trained on")
    x = torch.zeros(2, *shape, device=device)
    was_training = student.training
    student.eval()  # leaves the BatchNorm statistics untouched
    try:
        with torch.no_grad():
            for role, spec, model in (("teacher", teacher.arch, teacher.model), ("student", cfg.student, student)):
                try:
                    model(x)
                except Exception as err:  # a foreign architecture can fail in any way
                    raise UserError(f"the {role} '{spec}' cannot take {'x'.join(map(str, shape))} inputs "
                                    f"({type(err).__name__}: {str(err).strip()[:200]})") from None
            if cfg.msarc > 0:
                try:
                    t_logits, t_features = teacher.model(x, return_features=True)
                    _, s_features = student(x, return_features=True)
                    msarc_loss([f.float() for f in s_features], [f.float() for f in t_features],
                               student.classifier_weight().float(), teacher.model.classifier_weight().float(),
                               t_logits.float())
                except Exception as err:
                    raise UserError(f"mSARC cannot pair the student '{cfg.student}' with the teacher "
                                    f"'{teacher.arch}' ({type(err).__name__}: {str(err).strip()[:200]}); pass "
                                    "--no-msarc or choose another student") from None
    finally:
        student.train(was_training)


def build_world(cfg: RunConfig, device: torch.device) -> World:
    test_set, info = load_dataset(cfg.dataset, "test", root=cfg.data_root or None)
    teacher, view = load_teacher(cfg, info, device)
    with torch.random.fork_rng(devices=[]):  # the student's initial weights are a function of --seed alone
        torch.manual_seed(cfg.seed)
        student = resolve_classifier(cfg.student, info).model.to(device)
    check_forward(cfg, teacher, student, info, view, device)
    check_buffer_fits(cfg, info, view, device)
    generator, prior = None, None
    if cfg.method in ("diffdfkd", "dmkd"):
        generator = guided_sampler(cfg, info, teacher, view, device)
        check_pool_scheduler(cfg, generator)
        prior = generator.prior
        if cfg.guidance_scale != RunConfig.guidance_scale and not prior.condition([0]).is_conditional:
            log.warning("the prior is unconditional: --guidance-scale %g has no effect", cfg.guidance_scale)
    elif cfg.method == "deepinv":
        generator = DeepInversionGenerator(teacher.model, view, info.num_classes, deepinversion_config(cfg))
    real_train = real_train_set(cfg) if cfg.method == "real-kd" else None  # a bad --real-split fails before writes
    speed_up(cfg, device, prior, teacher.model, student)
    return World(teacher, student, info, test_set, view, generator, prior, real_train)
