"""Counted FLOPs per image of each step of a run, at Stable Diffusion scale and in the default world (issue 19).

    python -m benchmarks.flops              # -> benchmarks/results/flops.json (seconds on a CPU, no weights)

Counted, not timed: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention forward and
backward; elementwise ops, norms and the optimizer count 0) on **meta tensors**, so no weights are loaded and the
SD-1.5 UNet costs nothing to build. The networks are diffusers/zoo models built from their published configs
(below); the prior adapters of models/priors/ and ``GuidedSampler.step`` of engine/synthesis/guided.py run unchanged.
Two things do not pass through meta tensors and are worked around, not re-implemented: ``prior.condition`` validates
the class ids on the host, so the benchmark builds the same ``Cond`` from the adapter's tables; the sampler reads the
timestep on the host (``int(t)``), so the micro-batch's scheduler keeps its timesteps on the CPU. The student KD step
(``engine.loop.student_step``, sync-free since issue 14) runs on real CPU tensors at batch 2.

Per image: a sampler step in each mode (unguided: CFG, one UNet call on 2B; full: ε̂ through the UNet and the
decoder, forward + backward, ε̂ recomputed; detached: ε̂ without its graph, recomputed; detached + reuse), the final
decode + teacher logits, one teacher forward, one KD sample; and the whole image at ``--steps`` sampler steps plus its
share of KD (``batch_size · student_steps / images`` samples, 128 at the defaults). ``images/s at peak`` divides the
dense bf16 peak of an H100/H200 (989 TFLOP/s) by that: a physical upper bound, reached only at 100% MFU.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, run_metadata, write_results
from engine.config import RunConfig

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16 tensor-core FLOP/s

# Published configs (runwayml/stable-diffusion-v1-5 unet/, vae/, scheduler/; facebook/DiT-XL-2-256 transformer/,
# scheduler/, whose VAE is sd-vae-ft-ema, the SD VAE's architecture; madebyollin/taesd = AutoencoderTiny's defaults).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
SD15_SCHEDULER = dict(  # PNDM in the SD folder; the engine builds DDIM from it (models.priors.build_scheduler)
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
)
SD15_TEXT = (77, 768)  # CLIP ViT-L/14 prompt embeddings: run once per class at load, not per image
DIT_XL2 = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, norm_num_groups=32,
    sample_size=32, patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, attention_bias=True,
    upcast_attention=False, norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5,
)
DIT_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                     clip_sample=False)
CIFAR = dict(classes=10, channels=3, size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))

# name -> (prior, prior resolution in px or None = native, guidance decoder, teacher, student, teacher task)
WORLDS = {
    "sd15-512": ("sd15", None, "full", "resnet34", "resnet18", "cifar"),
    "sd15-512-tiny": ("sd15", None, "tiny", "resnet34", "resnet18", "cifar"),
    "sd15-256": ("sd15", 256, "full", "resnet34", "resnet18", "cifar"),
    "sd15-256-tiny": ("sd15", 256, "tiny", "resnet34", "resnet18", "cifar"),
    "dit-xl2-256": ("dit-xl2", None, "full", "resnet34", "resnet18", "cifar"),
    "dit-xl2-256-tiny": ("dit-xl2", None, "tiny", "resnet34", "resnet18", "cifar"),
    "default": ("default", None, "full", "convnet2-w32", "convnet2-w16", "mnist"),
}
MODES = {  # sampler-step mode -> GuidanceConfig fields (L_adv on: the loop's steady state after its warm-up)
    "unguided": dict(bn=0.0, cls=0.0, adv=0.0),
    "full": dict(grad_mode="full", recompute_eps=True),
    "detached": dict(grad_mode="detached", recompute_eps=True),
    "detached_reuse": dict(grad_mode="detached", recompute_eps=False),
}


def counted(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class _MetaPrompts(torch.nn.Module):
    """Tokenizer and text encoder in one: SD-1.5-shaped prompt embeddings (77 x 768), on the default device."""

    model_max_length = SD15_TEXT[0]

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"use_attention_mask": False})()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def __call__(self, prompts, **_):
        if isinstance(prompts, list):  # as the tokenizer
            return type("Tokens", (), {"input_ids": torch.zeros(len(prompts), 1, dtype=torch.long)})()
        return (torch.zeros(len(prompts), *SD15_TEXT),)


def build_prior(kind: str, class_names, image_size: int | None, guidance_decoder: str):
    """The engine's prior adapter around a diffusers network built from its config, on the current default device."""
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        DDPMScheduler,
        DiTTransformer2DModel,
        UNet2DConditionModel,
        UNet2DModel,
    )

    from engine.classifiers import DEFAULT_PRIOR
    from models.priors import DiTPrior, PixelPrior, StableDiffusionPrior, build_scheduler

    if kind == "sd15":
        prompts = _MetaPrompts()
        prior = StableDiffusionPrior(UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE), prompts, prompts,
                                     build_scheduler("ddim", SD15_SCHEDULER), class_names, image_size=image_size)
    elif kind == "dit-xl2":
        prior = DiTPrior(DiTTransformer2DModel(**DIT_XL2), AutoencoderKL(**SD15_VAE),
                         build_scheduler("ddim", DIT_SCHEDULER), class_names, list(range(len(class_names))),
                         image_size)
    else:  # the committed default prior, from its saved configs
        unet = UNet2DModel.from_config(UNet2DModel.load_config(DEFAULT_PRIOR / "unet"))
        scheduler = build_scheduler("ddim", DDPMScheduler.load_config(DEFAULT_PRIOR / "scheduler"))
        prior = PixelPrior(unet, scheduler, class_names, image_size=image_size)
    if guidance_decoder == "tiny":
        prior.set_guidance_decoder(AutoencoderTiny())
    return prior


def meta_batch(sampler, n: int):
    """What ``GuidedSampler.start`` makes, on meta tensors (see the module doc for the two host reads avoided)."""
    from engine.sampler import GenerationBatch
    from models.priors import Cond

    prior = sampler.prior
    labels = torch.arange(n) % sampler.num_classes
    scheduler = copy.deepcopy(sampler._scheduler)
    scheduler.set_timesteps(sampler.config.steps, device="cpu")
    ids = labels.to("meta")
    return GenerationBatch(
        z=torch.empty(n, *prior.latent_shape, device="meta"), labels=ids,
        label_weights=F.one_hot(labels, sampler.num_classes).float().to("meta"), seeds=torch.arange(n),
        cond=Cond(prior._null_condition(n), prior._class_condition(ids)), scheduler=scheduler,
        generator=torch.Generator(), skipped=torch.zeros((), dtype=torch.long, device="meta"))


def count_sampler(prior, teacher, student, view, num_classes: int, steps: int, n: int = 2) -> dict[str, float]:
    """FLOPs per image of one sampler step in each of ``MODES``, of its parts, and of the final decode (meta)."""
    from engine.sampler import GuidanceConfig, GuidedSampler

    out = {}
    for mode, fields in MODES.items():
        config = GuidanceConfig(**{"adv": 1.0, "steps": steps, **fields})
        sampler = GuidedSampler(prior, teacher, view, num_classes, config)
        batch = meta_batch(sampler, n)
        out[f"step_{mode}"] = counted(lambda: sampler.step(batch, student)) / n  # noqa: B023 (called at once)
    batch = meta_batch(sampler, n)
    t = batch.scheduler.timesteps[0]
    with torch.no_grad():
        z0 = batch.z
        out["prior_forward_cfg"] = counted(lambda: prior.predict_noise(z0, t, batch.cond, 2.0)) / n
        out["decode_full"] = counted(lambda: prior.decode(z0)) / n
        out["decode_for_guidance"] = counted(lambda: prior.decode_for_guidance(z0)) / n
        out["finish"] = counted(lambda: sampler.finish(batch)) / n  # final VAE decode + teacher logits
        images = torch.empty(n, view.channels, view.size, view.size, device="meta")
        out["teacher_forward"] = counted(lambda: teacher(view.normalize(images))) / n
    return out


def count_kd_sample(teacher_arch: str, student_arch: str, task: dict, batch: int = 2) -> float:
    """FLOPs per sample of the engine's KD step (KL + mSARC, teacher recomputed), real CPU tensors at ``batch``."""
    from accelerate import Accelerator

    from engine.loop import student_step
    from engine.replay_buffer import ReplayBuffer
    from engine.sampler import TeacherView
    from losses import WeightedSum
    from models.registry import build_classifier

    cfg = RunConfig(batch_size=batch)
    k, c, s = task["classes"], task["channels"], task["size"]
    torch.manual_seed(0)
    teacher = build_classifier(teacher_arch, k, c).eval().requires_grad_(False)
    student = build_classifier(student_arch, k, c)
    view = TeacherView(s, c, task["mean"], task["std"])
    buffer = ReplayBuffer(batch, (c, s, s), k, torch.device("cpu"))
    buffer.add(torch.rand(batch, c, s, s), torch.randn(batch, k), torch.rand(batch, k), torch.arange(batch))
    optimizer = torch.optim.AdamW(student.parameters(), cfg.lr)
    kd_loss = WeightedSum({"kl": 1.0, "msarc": cfg.msarc}, name="L_kd")
    accelerator = Accelerator(cpu=True)
    flops = counted(lambda: student_step(cfg, student, student, teacher, view, buffer, optimizer, accelerator,
                                         kd_loss, torch.Generator().manual_seed(0)))
    return flops / batch


def count_world(name: str, steps: int) -> dict:
    from engine.datasets import MNIST_MEAN, MNIST_STD
    from engine.sampler import TeacherView
    from models.registry import build_classifier

    prior_kind, resolution, decoder, teacher_arch, student_arch, task_name = WORLDS[name]
    task = CIFAR if task_name == "cifar" else dict(classes=10, channels=1, size=28, mean=MNIST_MEAN, std=MNIST_STD)
    names = [f"class{k}" for k in range(task["classes"])]
    with torch.device("meta"):
        prior = build_prior(prior_kind, names, resolution, decoder)
        teacher = build_classifier(teacher_arch, task["classes"], task["channels"]).eval().requires_grad_(False)
        student = build_classifier(student_arch, task["classes"], task["channels"]).eval().requires_grad_(False)
        view = TeacherView(task["size"], task["channels"], task["mean"], task["std"])
    row = {"prior": prior_kind, "prior_image_size": prior.image_size, "latent_shape": list(prior.latent_shape),
           "guidance_decoder": decoder, "teacher": teacher_arch, "student": student_arch,
           "teacher_input": [task["channels"], task["size"], task["size"]]}
    row |= count_sampler(prior, teacher, student, view, task["classes"], steps)
    row["kd_per_sample"] = count_kd_sample(teacher_arch, student_arch, task)
    return row


def per_image(row: dict, steps: int, kd_draws: float) -> dict:
    """One finished image at ``steps`` sampler steps in each mode, + its share of KD, and the implied peak rate."""
    out = {}
    for mode in MODES:
        synthesis = steps * row[f"step_{mode}"] + row["finish"]
        total = synthesis + kd_draws * row["kd_per_sample"]
        out[mode] = {"synthesis_flops": synthesis, "with_kd_flops": total,
                     "images_per_s_at_peak_synthesis": PEAK_BF16 / synthesis,
                     "images_per_s_at_peak_with_kd": PEAK_BF16 / total}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = RunConfig()
    parser.add_argument("--steps", type=int, default=15, help="sampler steps per image, every one guided (15: "
                        "flops.json; the digits run samples 25, guiding every 2nd)")
    parser.add_argument("--worlds", nargs="+", choices=list(WORLDS), default=list(WORLDS))
    parser.add_argument("--out", default=RESULTS_DIR / "flops.json")
    args = parser.parse_args(argv)

    kd_draws = defaults.batch_size * defaults.student_steps / defaults.images
    results = {"peak_bf16_flops": PEAK_BF16, "steps": args.steps, "kd_samples_per_image": kd_draws, "worlds": {}}
    for name in args.worlds:
        row = count_world(name, args.steps)
        row["per_image"] = per_image(row, args.steps, kd_draws)
        results["worlds"][name] = row
        print(name, json.dumps({k: f"{v:.4g}" for k, v in row.items() if isinstance(v, float)}), flush=True)
    worlds = results["worlds"]
    if "sd15-512" in worlds:  # issue 19's target: >= 3x fewer counted FLOPs per guided SD-1.5 image, tiny + 256 px
        base = worlds["sd15-512"]["per_image"]["full"]["synthesis_flops"]
        results["reduction_vs_sd15_512_full"] = {
            name: base / row["per_image"]["full"]["synthesis_flops"] for name, row in worlds.items()
            if name.startswith("sd15")}
    write_results(results | run_metadata("benchmarks.flops", argv), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
