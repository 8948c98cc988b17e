"""What one loop tick costs on the default world: a guided denoising step per image for each grad mode, and a
student KD step for each KD setting. Measured through the engine's own pieces of a tick: the generation pool's
``tick`` (engine/synthesis/pool.py, ``--in-flight`` micro-batches of ``--gen-batch`` in flight, every one guided) and
``engine.loop.student_step``.

    python -m benchmarks.step_costs --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import RESULTS_DIR, run_metadata, write_results


def per_call_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def default_world():
    """The default world's pieces a tick uses: (dataset info, teacher spec, prior, teacher view, fresh student)."""
    from engine.classifiers import DEFAULT_PRIOR, resolve_classifier
    from engine.config import RunConfig
    from engine.datasets import dataset_info
    from engine.synthesis.guided import TeacherView
    from models.priors import load_prior
    from models.registry import build_classifier

    info = dataset_info("mnist")
    teacher = resolve_classifier("default", info)
    teacher.model.eval().requires_grad_(False)
    prior = load_prior(str(DEFAULT_PRIOR), info.class_names)
    view = TeacherView(28, 1, teacher.mean, teacher.std)
    return info, teacher, prior, view, build_classifier(RunConfig().student, 10, 1).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--gen-batch", type=int, default=50)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=RESULTS_DIR / "step_costs.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    from engine.config import RunConfig
    from engine.loop import student_step
    from engine.replay_buffer import ReplayBuffer
    from engine.synthesis.guided import GuidanceConfig, GuidedSampler
    from engine.synthesis.pool import DiffusionPool
    from losses import WeightedSum
    from models.registry import build_classifier

    info, teacher, prior, view, student = default_world()
    results: dict = {"threads": args.threads, "gen_batch": args.gen_batch, "in_flight": args.in_flight,
                     "guided_step_ms_per_image": {}, "kd_step_ms": {}}
    modes = {"unguided (CFG 2)": dict(bn=0, cls=0), "full": {}, "full + adv": dict(adv=1.0),
             "detached": dict(grad_mode="detached"), "detached + reuse eps": dict(grad_mode="detached",
                                                                                 recompute_eps=False)}
    for name, overrides in modes.items():
        sampler = GuidedSampler(prior, teacher.model, view, 10, GuidanceConfig(steps=50, **overrides))
        pool = DiffusionPool(sampler, torch.Generator().manual_seed(0))
        for k in range(args.in_flight):  # all admitted together: every micro-batch is guided at every tick
            pool.admit(torch.arange(args.gen_batch) % 10, torch.arange(args.gen_batch) + k * args.gen_batch)
        ms = per_call_ms(lambda: pool.tick(student), args.repeats) / len(pool)  # noqa: B023
        results["guided_step_ms_per_image"][name] = ms
        print(f"guided step, {name:22s} {ms:7.2f} ms/image", flush=True)

    buffer = ReplayBuffer(1000, (1, 28, 28), 10)
    buffer.add(torch.rand(1000, 1, 28, 28), torch.randn(1000, 10), torch.rand(1000, 10), torch.arange(1000))
    accelerator = Accelerator(cpu=True)
    settings = {"kl + msarc (default)": dict(msarc=1.0), "kl, teacher recomputed": dict(msarc=0.0),
                "kl, cached teacher logits": dict(msarc=0.0, teacher_logits="cached")}
    for name, overrides in settings.items():
        cfg = RunConfig(**overrides)
        trainee = build_classifier(RunConfig().student, 10, 1)
        optimizer = torch.optim.AdamW(trainee.parameters(), 1e-3)
        kd = WeightedSum({"kl": 1.0, "msarc": cfg.msarc}, name="L_kd")
        generator = torch.Generator().manual_seed(0)  # the loop's is on the training device: the CPU here
        args_kd = (cfg, trainee, trainee, teacher.model, view, buffer, optimizer, accelerator, kd, generator)
        ms = per_call_ms(lambda: student_step(*args_kd), 5 * args.repeats)  # noqa: B023
        results["kd_step_ms"][name] = ms
        print(f"KD step (batch {cfg.batch_size}), {name:26s} {ms:7.1f} ms", flush=True)
    write_results(results | run_metadata("benchmarks.step_costs", argv), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
