"""Accuracy of every method on an embedded world (``--world``, default digits), in the same engine, at the same
synthetic-image budget and the same number of student steps; several seeds; mean ± std of the last-step accuracy
(best-step reported beside it, never used for selection).

    python -m benchmarks.accuracy --runs runs/bench-accuracy-default            # the default budget (headline)
    python -m benchmarks.accuracy --images 500 --student-steps 500 --out benchmarks/results/accuracy_500.json \
        --extra --sampler-steps 10                                               # a 4x smaller budget
    python -m benchmarks.accuracy --world fashion    # the fashion world -> benchmarks/results/accuracy_fashion.json

Rows: teacher; student from scratch on real data (the first --images of the teacher's own train split: MNIST
train; Fashion-MNIST half A); real-data KD; DeepInversion; DM-KD; DiffDFKD offline; ours online.
Each engine run is a subprocess ``python -m engine.run ...`` exactly as a user would type it; its run directory is
kept under ``--runs`` so every number can be traced to its config.json and metrics.jsonl.

Every method row carries its counted work (``benchmarks.compute``: FLOPs per generated image and per student step,
prior forwards per image, the run's total) and wall time. ``--equal-compute`` methods (default: DM-KD and
DeepInversion) are also run with the number of images that ours-online's total FLOPs buy them at the same student
steps: the ``equal_compute`` rows. The counts are cached in runs/compute-cache.json (``benchmarks.compute``), so a
``--reuse`` rewrite of a table counts nothing twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import run_metadata, write_results
from benchmarks.compute import METHOD_FLAGS, cost_row, images_at_equal_compute, method_cost, run_flops
from benchmarks.engine_runs import (
    add_world_flag,
    budget_flags,
    budget_parser,
    budget_record,
    run_engines,
    seed_rows,
    world_paths,
)
from engine.config import WORLDS

METHODS = METHOD_FLAGS
# The real data a world's scratch student learns from: the teacher's own train split (never the prior's half).
SCRATCH_SPLIT = {"digits": "train", "fashion": "half-a"}


def scratch_student(args, seed: int, out: Path, reuse: bool) -> dict:
    """The student trained from scratch on the real images with labels (same image count and steps)."""
    meta = out.with_suffix(".json")
    if not (reuse and meta.exists()):
        epochs = args.student_steps * 128 / args.images
        world = WORLDS[args.world]
        subprocess.run([sys.executable, "-m", "engine.train_teacher", "--arch", world["student"],
                        "--dataset", world["dataset"], "--split", SCRATCH_SPLIT[args.world],
                        "--limit", str(args.images),
                        "--epochs", f"{epochs:.4f}", "--seed", str(seed), "--out", str(out)],
                       check=True, stderr=subprocess.DEVNULL)
    return {"student_acc": json.loads(meta.read_text())["test_accuracy"]}


def main(argv: list[str] | None = None) -> int:
    parser = budget_parser(__doc__, images=2000, student_steps=2000, runs=None, out=None)
    add_world_flag(parser)
    parser.add_argument("--methods", nargs="+", default=["scratch-real", *METHODS],
                        choices=["scratch-real", *METHODS])
    parser.add_argument("--equal-compute", nargs="*", default=["dmkd", "deepinv"], choices=list(METHODS),
                        help="methods also run at ours-online's counted FLOPs (more or fewer images, same steps)")
    args = parser.parse_args(argv)
    world_paths(args, "accuracy")

    world = WORLDS[args.world]
    teacher = json.loads(subprocess.run([sys.executable, "-m", "engine.evaluate", "--teacher", world["teacher"],
                                         "--dataset", world["dataset"]], check=True, capture_output=True,
                                        text=True).stdout)
    results = {"teacher": {"accuracy": teacher["accuracy"]}, "methods": {}}
    budget = budget_flags(args)
    engine_methods = [name for name in args.methods if name in METHODS]
    rows = {}
    if "scratch-real" in args.methods:
        rows["scratch-real"] = [scratch_student(args, seed, args.runs / f"scratch-real-s{seed}", args.reuse)
                                for seed in args.seeds]
    costs = {name: method_cost([*METHODS[name], *budget])
             for name in METHODS if name in {*engine_methods, *args.equal_compute, "ours-online"}}
    # Equal compute: the images that ours-online's total FLOPs buy each method, at the same student steps. Counted
    # FLOPs do not depend on the runs, so these runs share one queue with the others (no core waits at a barrier).
    ours_total = run_flops(costs["ours-online"], args.images, args.student_steps)
    equal = {name: images_at_equal_compute(costs[name], ours_total, args.student_steps)
             for name in args.equal_compute}
    jobs = [(name, [*METHODS[name], "--seed", str(seed), *budget], args.runs / f"{name}-s{seed}")
            for name in engine_methods for seed in args.seeds]
    jobs += [(f"{name}@ours-compute", [*METHODS[name], "--seed", str(seed), *budget, "--images", str(equal[name])],
              args.runs / f"{name}-eqc-s{seed}") for name in equal for seed in args.seeds]
    summaries = iter(run_engines(jobs, args.reuse, args.jobs))
    for name in engine_methods:
        rows[name] = [next(summaries) for _ in args.seeds]
    for name, runs in rows.items():
        results["methods"][name] = seed_rows(runs, args.seeds)
    for name in engine_methods:
        results["methods"][name]["compute"] = cost_row(costs[name], args.images, args.student_steps)

    results["equal_compute"] = {}
    for name, images in equal.items():
        row = seed_rows([next(summaries) for _ in args.seeds], args.seeds)
        results["equal_compute"][name] = row | {"images": images,
                                                "compute": cost_row(costs[name], images, args.student_steps)}
    results["budget"] = budget_record(args)
    write_results(results | run_metadata("benchmarks.accuracy", argv), args.out)
    for group in ("methods", "equal_compute"):
        for name, entry in results[group].items():
            s = entry["last_mean_std"]
            print(f"{group:13s} {name:18s} {100 * s['mean']:6.2f} ± {100 * s['std']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
