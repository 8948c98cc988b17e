"""Throughput of guided synthesis: reference-style vs ours, images/s, peak memory, MFU, stream overlap.

    python -m benchmarks.throughput                 # CUDA: SD-1.5-architecture UNet+VAE at 512 px, ResNet-34 teacher
    python -m benchmarks.throughput --cpu-sized     # CPU: the default world (28 px pixel DDPM, MNIST teacher)

(a) reference-style (the DiffDFKD/DM-KD scripts): batch 1, fp16 on CUDA, ``empty_cache()`` every step, generation
    then training, no overlap;
(b) ours: batched guided steps, bf16 on CUDA, generation and student training overlapped on two streams.
Random weights: timing does not depend on them. The real sampler (engine/sampler.py) and the real student step
(engine/loop.py) are timed, bracketed by ``cuda.synchronize()``. FLOPs are counted with
``torch.utils.flop_counter`` on one guided step; MFU = counted FLOP/s / the device's dense bf16 peak.
Overlap efficiency = online wall time / max(generation-only, training-only) (1.0 is perfect overlap).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from benchmarks.common import RESULTS_DIR, run_metadata, write_results
from engine.config import RunConfig

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


class _RandomPrompts(torch.nn.Module):
    """Stands in for CLIP (tokenizer + text encoder): prompts are encoded once, outside the timed loop, so only the
    embedding shape (77 x 768 for SD 1.5) matters for timing."""

    model_max_length = 77

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"use_attention_mask": False})()
        self.weight = torch.nn.Parameter(torch.randn(1))

    def __call__(self, prompts, **_):  # as tokenizer: token ids; as text encoder: hidden states
        if isinstance(prompts, list):
            return type("Tokens", (), {"input_ids": torch.zeros(len(prompts), 77, dtype=torch.long),
                                       "attention_mask": None})()
        return (torch.randn(len(prompts), 77, 768),)


def sd15_prior(device, dtype, class_names):
    """An SD-1.5-architecture prior with random weights: UNet (860M) and VAE (84M) from their SD 1.5 configs."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from models.priors import StableDiffusionPrior

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False)
    prompts = _RandomPrompts()
    return StableDiffusionPrior(unet, vae, prompts, prompts, scheduler, class_names).to(device, dtype)


def timed(fn, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-sized", action="store_true", help="the default world instead of SD-1.5 at 512 px")
    parser.add_argument("--batch", type=int, default=0, help="ours: micro-batch size (default 16 CUDA, 50 CPU)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps per image")
    parser.add_argument("--out", default=RESULTS_DIR / "throughput.json")
    args = parser.parse_args(argv)

    from engine.classifiers import DEFAULT_PRIOR, resolve_classifier
    from engine.datasets import DatasetInfo, dataset_info
    from engine.sampler import GuidanceConfig, GuidedSampler, TeacherView
    from models.priors import load_prior
    from models.registry import build_classifier

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_sized else "cpu")
    if args.cpu_sized or device.type == "cpu":
        info = dataset_info("mnist")
        teacher = resolve_classifier("default", info).model.to(device).eval().requires_grad_(False)
        prior = load_prior(str(DEFAULT_PRIOR), info.class_names).to(device)
        view = TeacherView(28, 1, info.mean, info.std).to(device)
        student = build_classifier(RunConfig().student, 10, 1).to(device)
        batch = args.batch or 50
        world = "default world (28 px pixel DDPM 1.06M, convnet2-w32 teacher, convnet2-w16 student)"
    else:
        info = DatasetInfo("cifar10", tuple(f"class{i}" for i in range(10)), (0.5,) * 3, (0.25,) * 3, 32, 3)
        teacher = build_classifier("resnet34", 10, 3).to(device).eval().requires_grad_(False)
        prior = sd15_prior(device, torch.bfloat16, info.class_names)
        view = TeacherView(32, 3, info.mean, info.std).to(device)
        student = build_classifier("resnet18", 10, 3).to(device)
        batch = args.batch or 16
        world = "SD-1.5-architecture UNet+VAE at 512 px (64x64 latents), resnet34 teacher at 32 px, random weights"

    config = GuidanceConfig(steps=args.steps, adv=1.0)
    sampler = GuidedSampler(prior, teacher, view, info.num_classes, config)
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    def generate(n_images: int, micro: int, empty_cache: bool = False) -> None:
        for first in range(0, n_images, micro):
            labels = torch.arange(first, first + micro) % info.num_classes
            gen_batch = sampler.start(labels, torch.arange(first, first + micro))
            while not gen_batch.done:
                with autocast():
                    sampler.step(gen_batch, student)
                if empty_cache and device.type == "cuda":
                    torch.cuda.empty_cache()
            sampler.finish(gen_batch)

    results = {"world": world, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "steps": args.steps}
    generate(2, 2)  # warm-up
    n_ref = 2 if device.type == "cpu" else 4
    t_ref = timed(lambda: generate(n_ref, 1, empty_cache=True), device)
    results["reference_style"] = {"batch": 1, "images_per_s": n_ref / t_ref}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_ours = timed(lambda: generate(batch * 2, batch), device)
    results["ours"] = {"batch": batch, "images_per_s": 2 * batch / t_ours}
    if device.type == "cuda":
        results["ours"]["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    results["speedup"] = results["ours"]["images_per_s"] / results["reference_style"]["images_per_s"]

    one = sampler.start(torch.arange(batch) % info.num_classes, torch.arange(batch))
    with autocast():
        flops = count_flops(lambda: sampler.step(one, student))
    results["flops_per_image_step"] = flops / batch
    achieved = flops / batch * results["ours"]["images_per_s"] * args.steps
    results["achieved_tflops"] = achieved / 1e12
    peak = next((v for k, v in PEAK_BF16.items() if k in results["device"]), None)
    results["mfu"] = achieved / peak if peak else None
    write_results(results | run_metadata("benchmarks.throughput", argv), args.out)
    print({k: v for k, v in results.items() if k not in ("command", "machine")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
