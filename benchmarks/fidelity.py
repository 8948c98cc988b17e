"""DM-KD's first finding, tested with and without teacher guidance: does lower fidelity teach better?

    python -m benchmarks.fidelity --seeds 0 1 2 --images 300 --student-steps 300 --scales 1 4 --steps 5 15
    python -m benchmarks.fidelity --world fashion ...          # -> benchmarks/results/fidelity_fashion.json

A grid of classifier-free guidance scale × sampler steps, for ``--method dmkd`` (plain prior samples) and for ours,
at one image budget and one student schedule. Per cell: student accuracy (mean ± std over seeds) and two fidelity
proxies measured on the cell's own synthetic set (from the first seed's replay buffer, exported): the teacher's
BN-statistics distance and its mean confidence (max softmax probability).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.common import run_metadata, write_results
from benchmarks.engine_runs import (
    add_world_flag,
    budget_flags,
    budget_parser,
    budget_record,
    run_engines,
    seed_rows,
    world_paths,
)


@torch.no_grad()
def fidelity_proxies(run_dir: Path) -> dict:
    """BN-statistics distance (batches of 100) and mean teacher confidence on a run's exported synthetic set, for
    the run's own teacher (its config.json)."""
    from engine.classifiers import resolve_classifier
    from engine.datasets import dataset_info
    from losses import bn_stat_distance

    labels = torch.load(run_dir / "synthetic" / "labels.pt", weights_only=False)
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    images = torch.stack([pil_to_tensor(Image.open(run_dir / "synthetic" / f).convert("L")) for f in labels["files"]])
    config = json.loads((run_dir / "config.json").read_text())
    teacher = resolve_classifier(config["teacher_checkpoint"], dataset_info(config["dataset"]))
    x = teacher.normalize(images.float() / 255)
    distances = [bn_stat_distance(teacher.model, x[i : i + 100]) for i in range(0, len(x) - 99, 100)]
    confidence = torch.softmax(labels["teacher_logits"], 1).max(1).values.mean().item()
    return {"bn_distance": sum(distances) / max(len(distances), 1), "teacher_confidence": confidence}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["cells"])
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        scales, steps = results["guidance_scales"], results["sampler_steps"]
        grid = [[100 * results["cells"][method][f"s{s}-n{n}"]["last_mean_std"]["mean"] for s in scales] for n in steps]
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(scales)), [str(s) for s in scales])
        ax.set_yticks(range(len(steps)), [str(n) for n in steps])
        ax.set_xlabel("CFG scale")
        ax.set_ylabel("sampler steps")
        ax.set_title(f"{method}: student acc (%)")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = budget_parser(__doc__, images=1000, student_steps=1000, runs=None, out=None)
    add_world_flag(parser)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--methods", nargs="+", default=["dmkd", "diffdfkd"], choices=["dmkd", "diffdfkd"])
    args = parser.parse_args(argv)
    world_paths(args, "fidelity")
    results = {"guidance_scales": args.scales, "sampler_steps": args.steps, "cells": {},
               "budget": budget_record(args)}
    cells = [(method, n, s) for method in args.methods for n in args.steps for s in args.scales]
    jobs = []
    for method, n, s in cells:
        flags = ["--method", method, "--guidance-scale", str(s), "--sampler-steps", str(n)]
        for i, seed in enumerate(args.seeds):  # the first seed's synthetic set is exported for the proxies
            jobs.append((f"{method} s{s}-n{n}", [*flags, *(["--export"] if i == 0 else []), "--seed", str(seed),
                                                 *budget_flags(args)], args.runs / f"{method}-s{s}-n{n}-s{seed}"))
    summaries = iter(run_engines(jobs, args.reuse, args.jobs))
    for method, n, s in cells:
        cell = f"s{s}-n{n}"
        row = seed_rows([next(summaries) for _ in args.seeds], args.seeds)
        row |= fidelity_proxies(args.runs / f"{method}-{cell}-s{args.seeds[0]}")
        results["cells"].setdefault(method, {})[cell] = row
        print(method, cell, json.dumps({k: row[k] for k in ("last_mean_std", "bn_distance")}), flush=True)
    write_results(results | run_metadata("benchmarks.fidelity", argv), args.out)
    plot(results, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
