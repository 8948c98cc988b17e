"""The run configuration: one typed dataclass is the single source of defaults, and the CLI flags are generated
from it (``--field-name``; booleans that default to on become ``--no-NAME``). Unknown or ill-typed flags exit 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Literal

from engine.errors import UserError
from models.priors import SCHEDULERS

Method = Literal["diffdfkd", "dmkd", "deepinv", "real-kd"]
Schedule = Literal["online", "offline"]
# Sample seeds are seed·10⁷ + image index (engine/loop.py micro_batch), and the sampler seeds each micro-batch's
# generator with about 10⁶ times its first sample seed: both must stay within torch's 64-bit seed range (< 2⁶⁴), and
# the image index below 10⁷ so that two seeds never share a sample.
MAX_SEED = 999_999
MAX_IMAGES = 10_000_000
# --world: the embedded worlds (SPEC §7), each the flags it sets; an explicit flag overrides its world's value.
# digits must equal the dataclass defaults (today's default run). fashion: teacher on half A of Fashion-MNIST's
# train set, prior on half B (engine/datasets.py fashion_halves), weights in models/weights/*-fashion. α (bn) is
# per world: the best measured value differs (3 seeds each, BENCHMARKS.md "α per world"; digits 2.0 since
# 2026-12-05, was 0.1, then 1.0; fashion 0.25 since 2026-12-05, was 1.0, then 0.5 for a sitting); so is the sampler.
# So is the replay tail (BENCHMARKS.md "The fashion world's replay tail changed"): digits --kd-tail 0.5 since
# 2026-12-06 (0 before); fashion 0.75 since later that day (0 before, then 0.5 for a few hours).
# So is η, the latent step (BENCHMARKS.md "The fashion world's latent step changed"): fashion 0.05 since 2026-12-06
# late (0.1 before, digits' value). So is the boundary push (BENCHMARKS.md "The fashion world's class target
# changed"): fashion --cls-boundary 0.1 since 2026-12-07 (0 before); digits 0.
WORLDS: dict[str, dict[str, str | float]] = {
    "digits": {"teacher": "default", "prior": "default", "dataset": "mnist", "student": "convnet2-w16",
               "real_split": "train", "bn": 2.0, "step_size": 0.1, "sampler_steps": 25, "guide_every": 2,
               "kd_tail": 0.5, "cls_boundary": 0.0},
    "fashion": {"teacher": "fashion", "prior": "fashion", "dataset": "fashion-mnist", "student": "convnet2-w16",
                "real_split": "half-a",  # real-data KD draws from the teacher's half, never the prior's
                "bn": 0.25, "step_size": 0.05, "sampler_steps": 15, "guide_every": 1, "kd_tail": 0.75,
                "cls_boundary": 0.1},
}
World = Literal["digits", "fashion"]
# The guided step's settings, which --method dmkd (unguided prior samples) never reads, and the guided prior
# sampler's, which --method deepinv (its own --deepinv-* weights and iterations) and --method real-kd (no generator)
# never read.
GUIDED_STEP_FIELDS = frozenset({"bn", "cls", "cls_boundary", "step_size", "guidance_ramp", "guide_every"})
PRIOR_SAMPLER_FIELDS = GUIDED_STEP_FIELDS | {"sampler_steps"}
# Read only while an online run is still making images (see reads_online_schedule).
ONLINE_SCHEDULE_FIELDS = frozenset({"kd_tail", "class_focus"})
# What a run saved before a field existed did, where that is no longer the field's default.
VALUE_BEFORE_THE_FIELD = {"kd_tail": 0.0}


def reads_online_schedule(cfg: dict) -> bool:
    """Whether a run (its resolved config as a dict) reads ``ONLINE_SCHEDULE_FIELDS``: offline runs and real-data
    KD have every image before their first student step."""
    return cfg.get("method") != "real-kd" and cfg.get("schedule") != "offline"


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
    world: World = opt("digits", "embedded world: digits (MNIST teacher, prior on UCI 8x8 digits) | fashion "
                       "(Fashion-MNIST teacher on half A, prior on half B); sets --teacher --prior --dataset "
                       "--student --real-split --bn --sampler-steps --guide-every, which override it")
    teacher: str = opt("default", "pretrained name or checkpoint path")
    teacher_arch: str = opt("", "teacher architecture when the checkpoint has no JSON sidecar")
    student: str = opt("convnet2-w16", "student architecture (zoo name, tv:NAME or module:callable)")
    prior: str = opt("default", "diffusers folder or hub id of the prior ('default' or 'digits', 'fashion' = the "
                     "committed DDPMs)")
    dataset: str = opt("mnist", "the teacher's task; its real test split is used only to evaluate the student")
    real_split: str = opt("train", "split of --dataset that --method real-kd draws its real images from (the "
                          "teacher's training data: half-a in the fashion world)")
    data_root: str = opt("", "root folder of locally downloaded datasets (CIFAR, Tiny-ImageNet, DomainNet)")
    class_map: str = opt("", "JSON list/dict teacher class -> prior class id (DiT priors)")
    prompt_template: str = opt("a photo of a {}", "per-class prompt for text priors")
    class_free_prompt: str = opt("", "a single prompt for all samples (text priors, DomainNet-style runs)")
    prior_resolution: int = opt(0, "sample the prior (SD, DiT, pixel) at this many px instead of its native size "
                                "(e.g. 256 for SD 1.5 and a 32 px teacher; 0 = native)")
    guidance_decoder: Literal["full", "tiny"] = opt("full", "decoder of x̂0 inside the guided step: the prior's VAE "
                                                    "(full) or an AutoencoderTiny/TAESD (tiny, "
                                                    "--guidance-decoder-path); final images always use the VAE")
    guidance_decoder_path: str = opt("", "folder or hub id of the diffusers AutoencoderTiny for --guidance-decoder "
                                     "tiny (e.g. madebyollin/taesd for SD 1.x/2.x and DiT)")
    # --- synthesis (SPEC §2) -------------------------------------------------------------------------------------
    bn: float = opt(2.0, "α: weight of the BN-statistics loss (2.0 since 2026-12-05, was 0.1, then 1.0; --world "
                       "fashion: 0.25 since 2026-12-05; BENCHMARKS.md: levers)")
    cls: float = opt(10.0, "β: weight of the class-prior cross-entropy")
    cls_boundary: float = opt(0.0, "s: the guided step's L_cls target puts this share on each image's nearest "
                              "other class (the teacher's top class outside its label, per step): images near the "
                              "class boundary (0 = the label alone; --world fashion: 0.1 since 2026-12-07; "
                              "losses/class_prior.py)")
    adv: float = opt(1.0, "γ: weight of the adversarial loss (after --adv-warmup-images images)")
    step_size: float = opt(0.1, "η: latent step per timestep (per sample: the gradient is scaled by the batch size; "
                           "--world fashion: 0.05 since 2026-12-06)")
    guidance_ramp: float = opt(0.0, "ρ in [0, 1]: η·(1-ρ) at the noisiest step rising linearly to η·(1+ρ) at the "
                               "last (mean η; 0 = constant)")
    guidance_scale: float = opt(2.0, "classifier-free guidance scale of the prior")
    sampler_steps: int = opt(25, "sampler steps per image (digits world 25, fashion 15: BENCHMARKS.md)")
    scheduler: str = opt("ddim", f"diffusers scheduler: {', '.join(SCHEDULERS)} or a class name")
    grad_mode: Literal["full", "detached"] = opt("full", "latent gradient through the UNet (full) or not (detached)")
    reuse_eps: bool = opt(False, "reuse ε̂ from before the latent step for the scheduler step (saves a UNet call)")
    guide_every: int = opt(2, "guide on every m-th sampler step only (digits world 2, fashion 1)")
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
    guided_pass: Literal["auto", "pool", "micro-batch"] = opt(
        "auto", "the co-training pool's prior calls (guided forward + backward, and the eps recompute): one "
        "over every sample in flight (pool) or one per micro-batch (micro-batch: faster on CPU, python -m "
        "benchmarks.guided_pass); auto = pool on CUDA, micro-batch elsewhere; the same objective either way "
        "(each micro-batch keeps its own L_bn)")
    grad_checkpointing: bool = opt(False, "activation checkpointing in the prior's UNet/DiT and VAE decoder (less "
                                   "memory, about one more forward per guided step)", flag="--grad-checkpointing")
    memory_target_gb: float = opt(0.0, "CUDA: pick the largest --grad-chunk (gen-batch, then halved; checkpointing "
                                  "if needed) whose guided step peaks under this many GB (0 = off)")
    deepinv_iters: int = opt(100, "DeepInversion: Adam steps per batch (published: 2000)")
    deepinv_lr: float = opt(0.1, "DeepInversion: peak Adam learning rate on pixels in [0, 1] (cosine decay)")
    deepinv_bn: float = opt(10.0, "DeepInversion: α, weight of its BN-statistics loss (--bn is the prior's)")
    deepinv_cls: float = opt(1.0, "DeepInversion: β, weight of its cross-entropy (--cls is the prior's)")
    deepinv_first_bn_multiplier: float = opt(10.0, "DeepInversion: extra weight of the first BN layer's term")
    deepinv_tv_l1: float = opt(0.0, "DeepInversion: weight of the total-variation L1 prior")
    deepinv_tv_l2: float = opt(1e-4, "DeepInversion: weight of the total-variation L2 prior")
    deepinv_l2: float = opt(1e-5, "DeepInversion: weight of the image L2-norm prior")
    deepinv_jitter: int = opt(2, "DeepInversion: random roll of up to this many px per step (flips follow "
                              "--aug-flip)")
    # --- student training (SPEC §3) ------------------------------------------------------------------------------
    batch_size: int = opt(128, "student batch size")
    optimizer: Literal["sgd", "adam"] = opt("adam", "student optimizer (sgd: momentum 0.9, nesterov)")
    lr: float = opt(3e-3, "peak learning rate (cosine schedule with a short warm-up)")
    weight_decay: float = opt(1e-4, "weight decay")
    tau: float = opt(4.0, "τ: KD temperature")
    msarc: float = opt(1.0, "μ: weight of the mSARC attention/CAM consistency term")
    kd_steps_per_tick: int = opt(0, "student updates per loop tick (0 = spread student steps over generation)")
    min_buffer: int = opt(200, "images in the replay buffer before student training starts")
    replay_balance: float = opt(0.0, "replay-buffer draws with probability ∝ (1 + times drawn)^-P, evening out "
                                "exposure (0 = uniform)")
    kd_tail: float = opt(0.5, "online: fraction of the student steps kept for after the last image is made "
                         "(0 = spread them all over generation; digits world 0.5, fashion 0.75)")
    class_focus: float = opt(0.0, "online: classes of new images drawn ∝ (the student's mean KD loss on each class "
                             "since the last metrics line)^F (0 = round-robin; engine/class_focus.py)")
    buffer_capacity: int = opt(0, "replay buffer size in images (0 = the image budget)")
    adv_warmup_images: int = opt(300, "images made before the adversarial term turns on (either schedule; "
                                 "offline it then targets the untrained student, as synthesis runs first)")
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
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt("auto", "auto = bf16 on CUDA, fp32 on CPU "
                                                                 "(bf16 on CUDA also stores the frozen prior and "
                                                                 "teacher in bf16)")
    channels_last: bool = opt(True, "CUDA: channels_last memory format for the conv nets (prior, VAE, teacher, "
                              "student)", flag="--no-channels-last")
    compile: bool = opt(False, "torch.compile the prior's UNet/DiT and the student (opt-in; slow first steps)",
                        flag="--compile")
    eval_every: int = opt(500, "evaluate the student on the real test set every N student steps")
    log_every: int = opt(50, "write a metrics line every N student steps")
    checkpoint_every: int = opt(250, "write a resumable checkpoint every N ticks")
    checkpoint_minutes: float = opt(5.0, "also write one every N minutes of wall time (0 = by ticks only)")
    export: bool = opt(False, "export the synthetic set as an ImageFolder (+ labels.pt)", flag="--export")
    log_with: Literal["none", "tensorboard", "wandb", "all"] = opt("none", "experiment trackers (through accelerate): "
                                                                   "tensorboard (RUN_DIR/tensorboard), wandb "
                                                                   "(offline unless WANDB_MODE says otherwise), all")
    guidance_grid: bool = opt(True, "--method diffdfkd: guided_vs_unguided.png at the end (the same seeds with and "
                              "without teacher guidance, 4 per class for up to 10 classes)", flag="--no-guidance-grid")
    resume: bool = opt(False, "continue the run in --run-dir from its last checkpoint", flag="--resume")
    overwrite: bool = opt(False, "replace an existing --run-dir", flag="--overwrite")
    dry_run: bool = opt(False, "print the resolved config as JSON and exit", flag="--dry-run")

    # ----------------------------------------------------------------------------------------------------------------
    def resolved(self) -> RunConfig:
        """Apply the method presets and ablation toggles; validate. Returns a new config."""
        cfg = dataclasses.replace(self)
        hints = typing.get_type_hints(RunConfig)
        for f in dataclasses.fields(cfg):  # first: NaN passes every comparison below
            value = getattr(cfg, f.name)
            if hints[f.name] is float and not math.isfinite(value):
                raise UserError(f"--{f.name.replace('_', '-')} must be a finite number (got {value})")
        positive = ["images", "student_steps", "sampler_steps", "gen_batch", "in_flight", "batch_size",
                    "guide_every", "eval_every", "log_every", "checkpoint_every", "deepinv_iters"]
        for name in positive:
            if getattr(cfg, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(cfg, name)})")
        for name in ["bn", "cls", "adv", "step_size", "msarc", "cutmix_every", "repair_steps", "repair_band",
                     "kd_steps_per_tick", "min_buffer", "replay_balance", "max_step_rms", "buffer_capacity",
                     "adv_warmup_images", "aug_pad", "class_focus",
                     "lr", "weight_decay", "first_bn_multiplier", "grad_chunk", "memory_target_gb", "deepinv_lr",
                     "deepinv_bn", "deepinv_cls", "deepinv_first_bn_multiplier", "deepinv_tv_l1", "deepinv_tv_l2",
                     "deepinv_l2", "deepinv_jitter",
                     "checkpoint_minutes"]:
            if getattr(cfg, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(cfg, name)})")
        if cfg.tau <= 0 or cfg.guidance_scale <= 0 or cfg.cutmix_beta <= 0:
            raise UserError("--tau, --guidance-scale and --cutmix-beta must be positive")
        if not 0 <= cfg.cls_boundary < 1:
            raise UserError(f"--cls-boundary must lie in [0, 1) (got {cfg.cls_boundary}): the share of the target "
                            "moved to the nearest other class")
        if not 0 <= cfg.guidance_ramp <= 1:
            raise UserError(f"--guidance-ramp must lie in [0, 1] (got {cfg.guidance_ramp}): η·(1 ± ρ) stays >= 0")
        if not 0 <= cfg.kd_tail < 1:
            raise UserError(f"--kd-tail must lie in [0, 1) (got {cfg.kd_tail}): a fraction of the student steps")
        if not 0 <= cfg.cutmix_prob <= 1:
            raise UserError(f"--cutmix-prob must lie in [0, 1] (got {cfg.cutmix_prob})")
        if cfg.prior_resolution < 0:
            raise UserError(f"--prior-resolution must be >= 0 (got {cfg.prior_resolution}; 0 = native)")
        if cfg.guidance_decoder == "tiny" and not cfg.guidance_decoder_path:
            raise UserError("--guidance-decoder tiny needs --guidance-decoder-path (an AutoencoderTiny folder or hub "
                            "id, e.g. madebyollin/taesd)")
        if not 0 <= cfg.seed <= MAX_SEED:
            raise UserError(f"--seed must lie in [0, {MAX_SEED}] (got {cfg.seed}): sample seeds are derived as "
                            "seed * 10^7 + image index and must fit the 64-bit RNG seed")
        if cfg.images > MAX_IMAGES:
            raise UserError(f"--images must be at most {MAX_IMAGES:,} (got {cfg.images:,}): each image has its own "
                            "seed, seed * 10^7 + image index")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
            raise UserError(f"--device '{cfg.device}' is not a device; use auto, cpu, cuda or cuda:N")
        if cfg.prompt_template.count("{}") != 1 or not _formats(cfg.prompt_template):
            raise UserError(f"--prompt-template '{cfg.prompt_template}' must contain {{}} once, where the class name "
                            "goes (e.g. 'a photo of a {}')")
        if cfg.class_map:
            parse_class_map(cfg.class_map)
        if cfg.resume and cfg.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one")
        if cfg.method == "dmkd":  # DM-KD: plain prior samples, no teacher guidance (Li et al. 2023)
            cfg.use_bn = cfg.use_cls = cfg.use_adv = cfg.use_cutmix = False
        if cfg.method == "real-kd":
            cfg.use_bn = cfg.use_cls = cfg.use_adv = cfg.use_cutmix = False
        if cfg.method == "deepinv":  # no prior: no latents to mix
            cfg.use_cutmix = False
        cfg.bn, cfg.cls, cfg.adv = (cfg.bn * cfg.use_bn, cfg.cls * cfg.use_cls, cfg.adv * cfg.use_adv)
        cfg.deepinv_bn, cfg.deepinv_cls = cfg.deepinv_bn * cfg.use_bn, cfg.deepinv_cls * cfg.use_cls
        cfg.msarc *= cfg.use_msarc
        if not cfg.cls:  # the boundary share moves L_cls's target: without L_cls it has nothing to move
            cfg.cls_boundary = 0.0
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


def _formats(template: str) -> bool:
    try:
        template.format("name")
    except (IndexError, KeyError, ValueError):
        return False
    return True


def parse_class_map(text: str) -> dict | list:
    """``--class-map``: a JSON object or list (``{"0": 404, "1": 817}``, ``[404, 817]``), or the same as a Python
    literal (``{0: 404, 1: 817}``, the form the prior's error message shows). Keys: teacher class index or name;
    values: prior class id or label."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, RecursionError):
            value = None
    if not isinstance(value, dict | list) or not all(isinstance(v, int | str) for v in
                                                      (value.values() if isinstance(value, dict) else value)):
        raise UserError(f"--class-map {text!r} is not a map of teacher class -> prior class id; pass a JSON object "
                        "or list, e.g. --class-map '{\"0\": 404, \"1\": 817}' or '[404, 817]'")
    return value


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
            if f.default:  # "--no-bn  BN-statistics loss (default: True)" would read as if the flag turned it on
                common["help"] += f" (on by default; {flag} turns it off)"
            parser.add_argument(flag, action="store_false" if f.default else "store_true", **common)
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(flag, choices=choices.get(name, typing.get_args(kind)), **common)
        else:
            parser.add_argument(flag, type=kind, **common)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, except for on/off flags: their help says it (see add_config_flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.run",
        description="Online generator-student co-training for data-free knowledge distillation with diffusion priors.",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    add_config_flags(parser)
    return parser


def apply_world_defaults(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """Make ``--world``'s preset the parser's defaults, so that flags given explicitly still win over it. A first
    pass reads only ``--world`` (argparse exits 2 on an unknown world, naming the choices)."""
    world = parser.parse_known_args(argv)[0].world
    known = {action.dest for action in parser._actions}
    parser.set_defaults(**{k: v for k, v in WORLDS[world].items() if k in known})


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Flags -> RunConfig (argparse exits 2 on unknown or ill-typed flags), ``--world``'s preset applied."""
    parser = build_parser()
    apply_world_defaults(parser, argv)
    return RunConfig(**vars(parser.parse_args(argv)))
