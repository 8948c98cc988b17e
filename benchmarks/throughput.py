"""Throughput of guided synthesis: reference-style vs ours, images/s, peak memory, MFU, stream overlap.

    python -m benchmarks.throughput                 # CUDA: SD-1.5-architecture UNet+VAE at 512 px, ResNet-34 teacher
    python -m benchmarks.throughput --cpu-sized     # CPU: the default world (28 px pixel DDPM, MNIST teacher)
    python -m benchmarks.throughput --prior-resolution 256 --guidance-decoder tiny --compile   # issue 19's options

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
import copy
import json
import time

import torch

from benchmarks.common import RESULTS_DIR, run_metadata, synchronize, write_results
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


def sd15_prior(device, dtype, class_names, image_size=None):
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
    return StableDiffusionPrior(unet, vae, prompts, prompts, scheduler, class_names,
                                image_size=image_size).to(device, dtype)


def timed(fn, device) -> float:
    """Seconds ``fn()`` takes, bracketed by device syncs."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
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
    parser.add_argument("--train-steps", type=int, default=1, help="student steps per denoising step")
    parser.add_argument("--prior-resolution", type=int, default=0, help="SD: sample at this many px (0 = 512)")
    parser.add_argument("--guidance-decoder", choices=["full", "tiny"], default="full",
                        help="SD: x̂0 of the guided step from the VAE or a random-weight AutoencoderTiny (TAESD)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the prior's UNet and the student")
    parser.add_argument("--no-channels-last", action="store_true", help="CUDA: keep the conv nets NCHW")
    parser.add_argument("--out", default=RESULTS_DIR / "throughput.json")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    from engine.classifiers import DEFAULT_PRIOR, resolve_classifier
    from engine.datasets import DatasetInfo, dataset_info
    from engine.loop import student_step
    from engine.replay_buffer import ReplayBuffer
    from engine.sampler import GuidanceConfig, GuidedSampler, TeacherView
    from engine.streams import StreamPair, copy_weights
    from engine.world import frozen_dtype, speed_up, store_frozen
    from losses import WeightedSum
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
        prior = sd15_prior(device, torch.bfloat16, info.class_names, args.prior_resolution or None)
        if args.guidance_decoder == "tiny":
            from diffusers import AutoencoderTiny

            prior.set_guidance_decoder(AutoencoderTiny().to(device, torch.bfloat16))
        view = TeacherView(32, 3, info.mean, info.std).to(device)
        student = build_classifier("resnet18", 10, 3).to(device)
        batch = args.batch or 16
        world = "SD-1.5-architecture UNet+VAE, resnet34 teacher at 32 px, random weights"

    # As engine/world.py does: the frozen teacher in the compute dtype, channels_last on CUDA, opt-in compile.
    store_frozen(teacher, frozen_dtype(device, "auto"))
    speed_up(RunConfig(channels_last=not args.no_channels_last, compile=args.compile), device, prior, teacher, student)
    world += f", prior {prior.image_size} px, guidance decoder {args.guidance_decoder}" + ", compiled" * args.compile
    config = GuidanceConfig(steps=args.steps, adv=1.0)
    sampler = GuidedSampler(prior, teacher, view, info.num_classes, config)
    cuda = device.type == "cuda"

    def precision(dtype):  # bf16 (ours) or fp16 (reference-style) autocast on CUDA; fp32 on CPU
        return (lambda: torch.autocast("cuda", dtype)) if cuda else contextlib.nullcontext

    # The training side: the engine's KD step on a replay buffer of random images, the student's batch 128.
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    buffer = ReplayBuffer(512, (view.channels, view.size, view.size), info.num_classes, device)
    buffer.add(torch.rand(512, view.channels, view.size, view.size, device=device),
               torch.randn(512, info.num_classes, device=device), torch.rand(512, info.num_classes, device=device),
               torch.arange(512))
    kd_cfg = RunConfig(batch_size=128)
    optimizer = torch.optim.AdamW(student.parameters(), 1e-3)
    kd_loss = WeightedSum({"kl": 1.0, "msarc": kd_cfg.msarc}, name="L_kd")
    snapshot = copy.deepcopy(student).eval().requires_grad_(False)
    batch_generator = torch.Generator().manual_seed(0)

    def train_step() -> None:
        student_step(kd_cfg, student, student, teacher, view, buffer, optimizer, accelerator, kd_loss,
                     batch_generator)

    def generate(n_images: int, micro: int, autocast, empty_cache: bool = False, train_every_step: int = 0,
                 streams: StreamPair | None = None) -> None:
        """Micro-batches one after another; ``train_every_step`` student steps after each denoising step,
        on the train stream when ``streams`` is given (the loop's tick, engine/loop.py)."""
        streams = streams or StreamPair(device, enabled=False)
        for first in range(0, n_images, micro):
            labels = torch.arange(first, first + micro) % info.num_classes
            gen_batch = sampler.start(labels, torch.arange(first, first + micro))
            while not gen_batch.done:
                with streams.on("gen"):
                    streams.wait("gen", "trained")
                    copy_weights(snapshot, student)
                    streams.record("snapshotted", "gen")
                    with autocast():
                        sampler.step(gen_batch, snapshot)
                    if empty_cache and cuda:
                        torch.cuda.empty_cache()
                with streams.on("train"):
                    streams.wait("train", "snapshotted")
                    for _ in range(train_every_step):
                        train_step()
                    streams.record("trained", "train")
            with streams.on("gen"):
                sampler.finish(gen_batch)
        streams.join()

    results = {"world": world, "device": torch.cuda.get_device_name() if cuda else "cpu", "steps": args.steps,
               "train_steps_per_denoising_step": args.train_steps}
    generate(2, 2, precision(torch.bfloat16))  # warm-up
    train_step()
    n_ref = 2 if not cuda else 4
    # (a) reference-style: batch 1, fp16, empty_cache every step; then the same share of training, no overlap.
    ref = {"batch": 1, "precision": "fp16" if cuda else "fp32"}
    ref["generation_s"] = timed(lambda: generate(n_ref, 1, precision(torch.float16), empty_cache=True), device)
    ref_train_steps = max(1, round(args.train_steps * args.steps * n_ref / batch))
    ref["training_s"] = timed(lambda: [train_step() for _ in range(ref_train_steps)], device)
    ref["images_per_s"] = n_ref / (ref["generation_s"] + ref["training_s"])
    ref["generation_images_per_s"] = n_ref / ref["generation_s"]
    results["reference_style"] = ref
    # (b) ours: batched, bf16, generation and training overlapped on two streams.
    ours = {"batch": batch, "precision": "bf16" if cuda else "fp32", "streams": cuda}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    n_ours = 2 * batch
    train_steps = args.train_steps * args.steps * 2
    ours["generation_only_s"] = timed(lambda: generate(n_ours, batch, precision(torch.bfloat16)), device)
    ours["training_only_s"] = timed(lambda: [train_step() for _ in range(train_steps)], device)
    ours["online_s"] = timed(lambda: generate(n_ours, batch, precision(torch.bfloat16),
                                              train_every_step=args.train_steps, streams=StreamPair(device)), device)
    ours["images_per_s"] = n_ours / ours["online_s"]
    ours["generation_images_per_s"] = n_ours / ours["generation_only_s"]
    ours["overlap_efficiency"] = ours["online_s"] / max(ours["generation_only_s"], ours["training_only_s"])
    if cuda:
        ours["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    results["ours"] = ours
    results["speedup_images_per_s"] = ours["images_per_s"] / ref["images_per_s"]
    results["speedup_generation"] = ours["generation_images_per_s"] / ref["generation_images_per_s"]

    one = sampler.start(torch.arange(batch) % info.num_classes, torch.arange(batch))
    with precision(torch.bfloat16)():
        flops = count_flops(lambda: sampler.step(one, snapshot))
    results["flops_per_image_step"] = flops / batch
    achieved = flops / batch * ours["generation_images_per_s"] * args.steps
    results["achieved_tflops_generation"] = achieved / 1e12
    peak = next((v for k, v in PEAK_BF16.items() if k in results["device"]), None)
    results["mfu_generation"] = achieved / peak if peak else None
    write_results(results | run_metadata("benchmarks.throughput", argv), args.out)
    print(json.dumps({k: v for k, v in results.items() if k not in ("command", "machine")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
