"""Time per generation tick of the co-training pool (engine/synthesis/pool.py) on the default world, with its prior
calls (guided forward + backward, ε̂ recompute) over every sample in flight (``--guided-pass pool``) or per micro-batch
(``--guided-pass micro-batch``, what ``auto`` picks off CUDA). Same objective, same samples; the passes alternate
within one process, so the ratio is measured under the same load.

    python -m benchmarks.guided_pass --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import RESULTS_DIR, run_metadata, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--gen-batch", type=int, default=50)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two passes")
    parser.add_argument("--ticks", type=int, default=3, help="timed ticks per round (after one warm-up tick)")
    parser.add_argument("--out", default=RESULTS_DIR / "guided_pass.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from benchmarks.step_costs import default_world
    from engine.config import RunConfig
    from engine.synthesis.guided import GuidedSampler
    from engine.synthesis.pool import DiffusionPool
    from engine.world import guidance_config

    info, teacher, prior, view, student = default_world()
    seconds: dict[str, list[float]] = {"pool": [], "micro-batch": []}
    for _ in range(args.rounds):
        for guided_pass, times in seconds.items():
            cfg = RunConfig(guided_pass=guided_pass, gen_batch=args.gen_batch, in_flight=args.in_flight, adv=1.0,
                            guide_every=1)  # every sample in flight guided at every tick
            config = guidance_config(cfg)
            config.adv, config.steps = cfg.adv, 50  # L_adv on (as after its warm-up); no micro-batch finishes
            pool = DiffusionPool(GuidedSampler(prior, teacher.model, view, info.num_classes, config),
                                 torch.Generator().manual_seed(0))
            for k in range(args.in_flight):
                pool.admit(torch.arange(args.gen_batch) % 10, torch.arange(args.gen_batch) + k * args.gen_batch)
            pool.tick(student)  # warm-up
            start = time.perf_counter()
            for _ in range(args.ticks):
                pool.tick(student)
            times.append((time.perf_counter() - start) / args.ticks)
            print(f"{guided_pass:12s} {times[-1]:6.2f} s/tick", flush=True)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    results = {"threads": args.threads, "gen_batch": args.gen_batch, "in_flight": args.in_flight,
               "seconds_per_tick": seconds, "median_seconds_per_tick": median,
               "pool_over_micro_batch": median["pool"] / median["micro-batch"]}
    print(f"pool / micro-batch: {results['pool_over_micro_batch']:.2f}x the time per tick")
    write_results(results | run_metadata("benchmarks.guided_pass", argv), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
