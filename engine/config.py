"""The run configuration: one typed dataclass is the single source of defaults, and the CLI flags are generated
from it (``--field-name``; booleans that default to on become ``--no-NAME``). Unknown or ill-typed flags exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Literal

from engine.errors import UserError

Method = Literal["diffdfkd", "dmkd", "deepinv", "real-kd"]
Schedule = Literal["online", "offline"]


def opt(default, help: str, flag: str | None = None):
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass
class RunConfig:
    # --- what to run ---------------------------------------------------------------------------------------------
    run_dir: str = opt("runs/default", "output folder (config.json, metrics.jsonl, student.safetensors, ...)")
    seed: int = opt(0, "global seed; sample seeds are derived from it")
    method: Method = opt("diffdfkd", "diffdfkd (ours) | dmkd (unguided prior samples) | deepinv (pixel optimisation, "
                         "no prior) | real-kd (KD on the real train set, upper bound)")
    schedule: Schedule = opt("online", "online: generate and train in one loop; offline: synthesize all, then train")
    images: int = opt(2000, "synthetic-image budget")
    student_steps: int = opt(2000, "student optimizer steps")
    # --- models and data -----------------------------------------------------------------------------------------
    teacher: str = opt("default", "pretrained name or checkpoint path")
    teacher_arch: str = opt("", "teacher architecture when the checkpoint has no JSON sidecar")
    student: str = opt("convnet2-w16", "student architecture (zoo name, tv:NAME or module:callable)")
    prior: str = opt("default", "diffusers folder or hub id of the prior ('default' = the committed digits DDPM)")
    dataset: str = opt("mnist", "the teacher's task; its real test split is used only to evaluate the student")
    data_root: str = opt("", "root folder of locally downloaded datasets (CIFAR, Tiny-ImageNet, DomainNet)")
    class_map: str = opt("", "JSON list/dict teacher class -> prior class id (DiT priors)")
    prompt_template: str = opt("a photo of a {}", "per-class prompt for text priors")
    class_free_prompt: str = opt("", "a single prompt for all samples (text priors, DomainNet-style runs)")
    # --- synthesis (SPEC §2) -------------------------------------------------------------------------------------
    bn: float = opt(0.1, "α: weight of the BN-statistics loss")
    cls: float = opt(10.0, "β: weight of the class-prior cross-entropy")
    adv: float = opt(1.0, "γ: weight of the adversarial loss (after --adv-warmup student steps)")
    step_size: float = opt(0.1, "η: latent step per timestep (per sample: the gradient is scaled by the batch size)")
    guidance_scale: float = opt(2.0, "classifier-free guidance scale of the prior")
    sampler_steps: int = opt(15, "sampler steps per image")
    scheduler: str = opt("ddim", "diffusers scheduler: ddim, ddpm, dpm, pndm, unipc or a class name")
    grad_mode: Literal["full", "detached"] = opt("full", "latent gradient through the UNet (full) or not (detached)")
    reuse_eps: bool = opt(False, "reuse ε̂ from before the latent step for the scheduler step (saves a UNet call)")
    guide_every: int = opt(1, "guide on every m-th sampler step only")
    max_step_rms: float = opt(0.0, "cap on one sample's latent step (RMS per element; 0 = none)")
    first_bn_multiplier: float = opt(1.0, "extra weight of the first BN layer's term")
    divergence: Literal["kl", "js"] = opt("kl", "divergence of the adversarial term")
    cutmix_every: int = opt(5, "k: Latent CutMix every k sampler steps")
    cutmix_beta: float = opt(1.0, "β of the Beta distribution of the CutMix area")
    cutmix_prob: float = opt(0.5, "fraction of the samples mixed at each CutMix event")
    repair_steps: int = opt(2, "r: sampler steps of seam repair (inpainting) after each CutMix")
    repair_band: int = opt(2, "w: width of the repaired band around the box edge, in latent pixels")
    gen_batch: int = opt(50, "images per generation micro-batch")
    in_flight: int = opt(4, "micro-batches in flight at staggered timesteps")
    grad_chunk: int = opt(0, "latent gradient over chunks of this many samples of a micro-batch, one after another "
                          "(less peak memory; 0 = whole micro-batch); the BN-statistics term then sees each chunk's "
                          "statistics, the other terms are unchanged")
    grad_checkpointing: bool = opt(False, "activation checkpointing in the prior's UNet/DiT and VAE decoder (less "
                                   "memory, about one more forward per guided step)", flag="--grad-checkpointing")
    memory_target_gb: float = opt(0.0, "CUDA: pick the largest --grad-chunk (gen-batch, then halved; checkpointing "
                                  "if needed) whose guided step peaks under this many GB (0 = off)")
    deepinv_iters: int = opt(100, "optimisation steps per DeepInversion batch")
    deepinv_lr: float = opt(0.1, "Adam learning rate of DeepInversion's pixels")
    # --- student training (SPEC §3) ------------------------------------------------------------------------------
    batch_size: int = opt(128, "student batch size")
    optimizer: Literal["sgd", "adam"] = opt("adam", "student optimizer (sgd: momentum 0.9, nesterov)")
    lr: float = opt(3e-3, "peak learning rate (cosine schedule with a short warm-up)")
    weight_decay: float = opt(1e-4, "weight decay")
    tau: float = opt(4.0, "τ: KD temperature")
    msarc: float = opt(1.0, "μ: weight of the mSARC attention/CAM consistency term")
    kd_steps_per_tick: int = opt(0, "student updates per loop tick (0 = spread student steps over generation)")
    min_buffer: int = opt(200, "images in the replay buffer before student training starts")
    buffer_capacity: int = opt(0, "replay buffer size in images (0 = the image budget)")
    adv_warmup: int = opt(100, "student steps before the adversarial term turns on")
    teacher_logits: Literal["recompute", "cached"] = opt("recompute", "teacher logits on the augmented view "
                                                         "(recompute) or the ones cached at synthesis")
    aug_pad: int = opt(2, "random-crop padding of the student augmentation")
    aug_flip: bool = opt(False, "random horizontal flips (off for digits)", flag="--aug-flip")
    # --- ablations -----------------------------------------------------------------------------------------------
    use_bn: bool = opt(True, "BN-statistics loss", flag="--no-bn")
    use_cls: bool = opt(True, "class-prior loss", flag="--no-cls")
    use_adv: bool = opt(True, "adversarial loss", flag="--no-adv")
    use_cutmix: bool = opt(True, "Latent CutMix", flag="--no-cutmix")
    use_inpaint: bool = opt(True, "seam repair by inpainting after CutMix", flag="--no-inpaint")
    use_msarc: bool = opt(True, "mSARC term of the KD loss", flag="--no-msarc")
    use_streams: bool = opt(True, "separate CUDA streams for generation and training", flag="--no-streams")
    # --- system and outputs --------------------------------------------------------------------------------------
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt("auto", "auto = bf16 on CUDA, fp32 on CPU")
    eval_every: int = opt(500, "evaluate the student on the real test set every N student steps")
    log_every: int = opt(50, "write a metrics line every N student steps")
    checkpoint_every: int = opt(250, "write a resumable checkpoint every N ticks")
    export: bool = opt(False, "export the synthetic set as an ImageFolder (+ labels.pt)", flag="--export")
    resume: bool = opt(False, "continue the run in --run-dir from its last checkpoint", flag="--resume")
    overwrite: bool = opt(False, "replace an existing --run-dir", flag="--overwrite")
    dry_run: bool = opt(False, "print the resolved config as JSON and exit", flag="--dry-run")

    # ----------------------------------------------------------------------------------------------------------------
    def resolved(self) -> RunConfig:
        """Apply the method presets and ablation toggles; validate. Returns a new config."""
        cfg = dataclasses.replace(self)
        positive = ["images", "student_steps", "sampler_steps", "gen_batch", "in_flight", "batch_size",
                    "guide_every", "eval_every", "log_every", "checkpoint_every", "deepinv_iters"]
        for name in positive:
            if getattr(cfg, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(cfg, name)})")
        for name in ["bn", "cls", "adv", "step_size", "msarc", "cutmix_every", "repair_steps", "repair_band",
                     "kd_steps_per_tick", "min_buffer", "max_step_rms", "buffer_capacity", "adv_warmup", "aug_pad",
                     "lr", "weight_decay", "first_bn_multiplier", "grad_chunk", "memory_target_gb"]:
            if getattr(cfg, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(cfg, name)})")
        if cfg.tau <= 0 or cfg.guidance_scale <= 0 or cfg.cutmix_beta <= 0:
            raise UserError("--tau, --guidance-scale and --cutmix-beta must be positive")
        if not 0 <= cfg.cutmix_prob <= 1:
            raise UserError(f"--cutmix-prob must lie in [0, 1] (got {cfg.cutmix_prob})")
        if cfg.resume and cfg.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one")
        if cfg.method == "dmkd":  # DM-KD: plain prior samples, no teacher guidance (Li et al. 2023)
            cfg.use_bn = cfg.use_cls = cfg.use_adv = cfg.use_cutmix = False
        if cfg.method == "real-kd":
            cfg.use_bn = cfg.use_cls = cfg.use_adv = cfg.use_cutmix = False
        if cfg.method == "deepinv":  # no prior: no latents to mix
            cfg.use_cutmix = False
        cfg.bn, cfg.cls, cfg.adv = (cfg.bn * cfg.use_bn, cfg.cls * cfg.use_cls, cfg.adv * cfg.use_adv)
        cfg.msarc *= cfg.use_msarc
        if not cfg.use_cutmix:
            cfg.cutmix_every = 0
        if not cfg.use_inpaint or not cfg.cutmix_every:
            cfg.repair_steps = 0
        if cfg.buffer_capacity == 0:
            cfg.buffer_capacity = cfg.images
        if cfg.buffer_capacity < min(cfg.gen_batch, cfg.images):
            raise UserError(f"--buffer-capacity {cfg.buffer_capacity} is smaller than a generation micro-batch "
                            f"({cfg.gen_batch}); raise it (0 = the image budget)")
        cfg.min_buffer = min(cfg.min_buffer, cfg.images, cfg.buffer_capacity)
        return cfg

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def add_config_flags(parser: argparse.ArgumentParser, names=None, *, renamed: dict | None = None,
                     help: dict | None = None, choices: dict | None = None) -> None:
    """One flag per RunConfig field (all, or ``names``), typed from the dataclass; booleans that default to on
    become ``--no-NAME``. ``renamed``/``help``/``choices`` override a field's flag, help text or choices."""
    renamed, help, choices = renamed or {}, help or {}, choices or {}
    hints = typing.get_type_hints(RunConfig)
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name in names or fields:
        f, kind = fields[name], hints[name]
        flag = renamed.get(name) or f.metadata.get("flag") or "--" + name.replace("_", "-")
        common = {"dest": name, "default": f.default, "help": help.get(name, f.metadata.get("help", ""))}
        if kind is bool:
            parser.add_argument(flag, action="store_false" if f.default else "store_true", **common)
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(flag, choices=choices.get(name, typing.get_args(kind)), **common)
        else:
            parser.add_argument(flag, type=kind, **common)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.run",
        description="Online generator-student co-training for data-free knowledge distillation with diffusion priors.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    add_config_flags(parser)
    return parser


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Flags -> RunConfig (argparse exits 2 on unknown or ill-typed flags)."""
    return RunConfig(**vars(build_parser().parse_args(argv)))
