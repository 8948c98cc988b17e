"""Throughput of guided synthesis: reference-style vs ours, images/s, peak memory, MFU, stream overlap.

    python -m benchmarks.throughput                 # CUDA: SD-1.5-architecture UNet+VAE at 512 px, ResNet-34 teacher
    python -m benchmarks.throughput --cpu-sized     # CPU: the default world (28 px pixel DDPM, MNIST teacher)
    python -m benchmarks.throughput --prior-resolution 256 --guidance-decoder tiny --compile   # issue 19's options
    python -m benchmarks.throughput --sync-debug    # CUDA: torch.cuda.set_sync_debug_mode("warn") over ours

(a) reference-style (the DiffDFKD/DM-KD scripts): batch 1, fp16 on CUDA, ``empty_cache()`` every step, generation
    then training, no overlap (the guided sampler's own per-batch loop);
(b) ours: the engine's co-training loop itself (``engine.loop.co_train`` on a world built here): the generation pool,
    bf16 on CUDA, generation and student training on two streams. Timed three ways: online (the run), generation
    only (``--schedule offline`` with a single student step), training only (the same student steps of
    ``engine.loop.student_step`` on a full buffer).
Random weights: timing does not depend on them. Walls are the loop's own ``wall_seconds`` (set-up and final outputs
excluded) or bracketed by ``cuda.synchronize()``. FLOPs are counted with ``torch.utils.flop_counter`` (as
benchmarks/flops.py counts them) on one tick of a full pool; MFU = counted FLOP/s / the device's dense bf16 peak.
Overlap efficiency = online wall time / max(generation-only, training-only) (1.0 is perfect overlap, 2.0 none).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import tempfile
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
    parser.add_argument("--train-steps", type=int, default=1, help="ours: student steps per loop tick")
    parser.add_argument("--sync-debug", action="store_true",
                        help='CUDA: torch.cuda.set_sync_debug_mode("warn") during the online run')
    parser.add_argument("--prior-resolution", type=int, default=0, help="SD: sample at this many px (0 = 512)")
    parser.add_argument("--guidance-decoder", choices=["full", "tiny"], default="full",
                        help="SD: x̂0 of the guided step from the VAE or a random-weight AutoencoderTiny (TAESD)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the prior's UNet and the student")
    parser.add_argument("--no-channels-last", action="store_true", help="CUDA: keep the conv nets NCHW")
    parser.add_argument("--grad-chunk", type=int, default=-1,
                        help="ours: samples per guided forward+backward (-1: 4 on CUDA, the whole pool on CPU)")
    parser.add_argument("--out", default=RESULTS_DIR / "throughput.json")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    from engine.classifiers import DEFAULT_PRIOR, ClassifierSpec, resolve_classifier
    from engine.datasets import DatasetInfo, dataset_info
    from engine.loop import co_train, student_step
    from engine.outputs import RunOutputs
    from engine.replay_buffer import ReplayBuffer
    from engine.synthesis.guided import GuidanceConfig, GuidedSampler, TeacherView
    from engine.synthesis.pool import DiffusionPool
    from engine.world import World, frozen_dtype, speed_up, store_frozen
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
        world_name = "default world (28 px pixel DDPM 1.06M, convnet2-w32 teacher, convnet2-w16 student)"
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
        world_name = "SD-1.5-architecture UNet+VAE, resnet34 teacher at 32 px, random weights"

    # As engine/world.py does: the frozen teacher in the compute dtype, channels_last on CUDA, opt-in compile.
    store_frozen(teacher, frozen_dtype(device, "auto"))
    speed_up(RunConfig(channels_last=not args.no_channels_last, compile=args.compile), device, prior, teacher, student)
    world_name += f", prior {prior.image_size} px, guidance decoder {args.guidance_decoder}"
    world_name += ", compiled" * args.compile
    sampler = GuidedSampler(prior, teacher, view, info.num_classes, GuidanceConfig(steps=args.steps, adv=1.0))
    cuda = device.type == "cuda"

    def precision(dtype):  # bf16 (ours) or fp16 (reference-style) autocast on CUDA; fp32 on CPU
        return (lambda: torch.autocast("cuda", dtype)) if cuda else contextlib.nullcontext

    # (b)'s runs: the engine's loop on this world, the student's batch 128, 4 micro-batches in flight.
    in_flight, n_ours = 4, 8 * batch
    grad_chunk = args.grad_chunk if args.grad_chunk >= 0 else 4 if cuda else 0  # SD at 512 px: activation memory
    train_steps = max(1, args.train_steps * (n_ours // batch + in_flight - 1) * args.steps // in_flight)
    run_cfg = RunConfig(images=n_ours, gen_batch=batch, in_flight=in_flight, sampler_steps=args.steps,
                        student_steps=train_steps, batch_size=128, min_buffer=batch, buffer_capacity=n_ours,
                        adv_warmup_images=0, log_every=10**6, eval_every=10**6, checkpoint_every=10**6,
                        checkpoint_minutes=0, kd_steps_per_tick=args.train_steps, device=str(device),
                        mixed_precision="bf16" if cuda else "no", grad_chunk=grad_chunk)
    test_set = torch.utils.data.TensorDataset(torch.rand(8, view.channels, view.size, view.size),
                                              torch.zeros(8, dtype=torch.long))  # the final evaluation: cheap
    spec = ClassifierSpec(teacher, "teacher", info.mean, info.std, None, {})

    def engine_run(name: str, **overrides) -> dict:
        """One ``co_train`` on the world above (a fresh copy of the student); the loop's wall time and summary."""
        cfg = dataclasses.replace(run_cfg, **overrides)
        generator = GuidedSampler(prior, teacher, view, info.num_classes,
                                  GuidanceConfig(steps=args.steps, adv=0.0, grad_chunk=cfg.grad_chunk))
        world = World(spec, copy.deepcopy(student), info, test_set, view, generator, prior)
        accelerator = Accelerator(cpu=not cuda, mixed_precision=cfg.mixed_precision)
        with tempfile.TemporaryDirectory() as run_dir:
            summary = co_train(cfg, world, accelerator, RunOutputs(run_dir))
        return {"wall_s": summary["wall_seconds"], "images": summary["images"],
                "student_steps": summary["student_steps"], "ticks": summary["ticks"]}

    # The training side for (a) and (b)'s training-only time: the engine's KD step on a full buffer of random images.
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    buffer = ReplayBuffer(512, (view.channels, view.size, view.size), info.num_classes, device)
    buffer.add(torch.rand(512, view.channels, view.size, view.size, device=device),
               torch.randn(512, info.num_classes, device=device), torch.rand(512, info.num_classes, device=device),
               torch.arange(512))
    kd_cfg = RunConfig(batch_size=128)
    trainee = copy.deepcopy(student)
    optimizer = torch.optim.AdamW(trainee.parameters(), 1e-3, capturable=cuda)
    kd_loss = WeightedSum({"kl": 1.0, "msarc": kd_cfg.msarc}, name="L_kd")
    batch_generator = torch.Generator(device).manual_seed(0)

    def train_step() -> None:
        student_step(kd_cfg, trainee, trainee, teacher, view, buffer, optimizer, accelerator, kd_loss,
                     batch_generator)

    def generate_reference(n_images: int, autocast) -> None:
        """Batch 1, one micro-batch after another, ``empty_cache()`` after every step (the reference scripts)."""
        for first in range(n_images):
            one = sampler.start(torch.tensor([first % info.num_classes]), torch.tensor([first]))
            while not one.done:
                with autocast():
                    sampler.step(one, student)
                if cuda:
                    torch.cuda.empty_cache()
            sampler.finish(one)

    results = {"world": world_name, "device": torch.cuda.get_device_name() if cuda else "cpu", "steps": args.steps,
               "train_steps_per_tick": args.train_steps}
    generate_reference(1, precision(torch.bfloat16))  # warm-up
    train_step()
    engine_run("warm-up", images=batch, student_steps=1)
    n_ref = 2 if not cuda else 4
    # (a) reference-style: batch 1, fp16, empty_cache every step; then the same share of training, no overlap.
    ref = {"batch": 1, "precision": "fp16" if cuda else "fp32"}
    ref["generation_s"] = timed(lambda: generate_reference(n_ref, precision(torch.float16)), device)
    ref_train_steps = max(1, round(train_steps * n_ref / n_ours))
    ref["training_s"] = timed(lambda: [train_step() for _ in range(ref_train_steps)], device)
    ref["images_per_s"] = n_ref / (ref["generation_s"] + ref["training_s"])
    ref["generation_images_per_s"] = n_ref / ref["generation_s"]
    results["reference_style"] = ref
    # (b) ours: the engine's loop, online, then generation only and training only.
    ours = {"batch": batch, "in_flight": in_flight, "images": n_ours, "student_steps": train_steps,
            "precision": "bf16" if cuda else "fp32", "streams": cuda}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync_debug = torch.cuda.set_sync_debug_mode if cuda and args.sync_debug else (lambda mode: None)
    sync_debug("warn")  # CUDA prints a warning at every host sync from here on (ours only)
    ours["online"] = engine_run("online")
    sync_debug("default")
    ours["generation_only"] = engine_run("generation only", schedule="offline", student_steps=1)
    ours["training_only_s"] = timed(lambda: [train_step() for _ in range(train_steps)], device)
    ours["images_per_s"] = n_ours / ours["online"]["wall_s"]
    ours["generation_images_per_s"] = n_ours / ours["generation_only"]["wall_s"]
    ours["overlap_efficiency"] = ours["online"]["wall_s"] / max(ours["generation_only"]["wall_s"],
                                                                 ours["training_only_s"])
    if cuda:
        ours["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    results["ours"] = ours
    results["speedup_images_per_s"] = ours["images_per_s"] / ref["images_per_s"]
    results["speedup_generation"] = ours["generation_images_per_s"] / ref["generation_images_per_s"]

    # Counted FLOPs of one tick of a full pool (every micro-batch guided, L_adv on), per sample.
    sampler.config.grad_chunk = run_cfg.grad_chunk
    pool = DiffusionPool(sampler, torch.Generator(device).manual_seed(0))
    for k in range(in_flight):
        pool.admit(torch.arange(batch) % info.num_classes, torch.arange(batch) + k * batch)
    with precision(torch.bfloat16)():
        flops = count_flops(lambda: pool.tick(student))
    results["flops_per_image_step"] = flops / (in_flight * batch)
    achieved = results["flops_per_image_step"] * args.steps * ours["images_per_s"]
    results["achieved_tflops_online"] = achieved / 1e12
    peak = next((v for k, v in PEAK_BF16.items() if k in results["device"]), None)
    results["mfu_online"] = achieved / peak if peak else None
    write_results(results | run_metadata("benchmarks.throughput", argv), args.out)
    print(json.dumps({k: v for k, v in results.items() if k not in ("command", "machine")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
