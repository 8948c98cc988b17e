"""Cost–accuracy frontier of the synthesis: student accuracy against synthesis compute for sampler steps
(10/25/50), grad mode (full vs detached ε̂), and guidance on every step vs every m-th step.

    python -m benchmarks.frontier --seeds 0 --images 300 --student-steps 300 \
        --points steps10-full steps25-full steps25-detached steps25-every5
    python -m benchmarks.frontier --world fashion ...           # -> benchmarks/results/frontier_fashion.json

Compute is the run's wall time on this machine (the same machine for every point) and the UNet calls per image,
counted from the config: full grad mode = forward + backward through the UNet (≈3 forwards) + 1 recomputed forward
per guided step; detached = 1 + 1; unguided steps = 1 (×2 with classifier-free guidance, the same for all points).
"""

from __future__ import annotations

from pathlib import Path

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


def points() -> dict[str, list[str]]:
    grid = {}
    for steps in (10, 25, 50):
        grid[f"steps{steps}-full"] = ["--sampler-steps", str(steps)]
    grid["steps25-detached"] = ["--sampler-steps", "25", "--grad-mode", "detached"]
    grid["steps25-detached-reuse"] = ["--sampler-steps", "25", "--grad-mode", "detached", "--reuse-eps"]
    grid["steps25-every2"] = ["--sampler-steps", "25", "--guide-every", "2"]
    grid["steps25-every5"] = ["--sampler-steps", "25", "--guide-every", "5"]
    return grid


def unet_forwards_per_image(flags: list[str]) -> float:
    value = dict(zip(flags[::2], flags[1::2]))
    steps = int(value.get("--sampler-steps", 20))
    every = int(value.get("--guide-every", 1))
    guided = len(range(0, steps, every))
    per_guided = (1 if "--reuse-eps" in flags else 2) + (2 if value.get("--grad-mode", "full") == "full" else 0)
    return guided * per_guided + (steps - guided)


def plot(results: dict, path: Path, world: str = "digits") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in results["points"].items():
        x = row["unet_forwards_per_image"]
        y = 100 * row["last_mean_std"]["mean"]
        ax.errorbar(x, y, yerr=100 * row["last_mean_std"]["std"], fmt="o", capsize=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("UNet forward-equivalents per image (synthesis compute)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"cost-accuracy frontier, {world} world")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = budget_parser(__doc__, images=2000, student_steps=2000, runs=None, out=None)
    add_world_flag(parser)
    parser.add_argument("--points", nargs="+", default=list(points()), choices=list(points()))
    args = parser.parse_args(argv)
    world_paths(args, "frontier")
    budget = budget_flags(args)
    results = {"points": {}, "budget": budget_record(args)}
    jobs = [(name, [*flags, "--seed", str(s), *budget], args.runs / f"{name}-s{s}")
            for name, flags in points().items() if name in args.points for s in args.seeds]
    summaries = iter(run_engines(jobs, args.reuse, args.jobs))
    for name, flags in points().items():
        if name not in args.points:
            continue
        runs = [next(summaries) for _ in args.seeds]
        results["points"][name] = seed_rows(runs, args.seeds) | {
            "flags": flags, "unet_forwards_per_image": unet_forwards_per_image(flags)}
    write_results(results | run_metadata("benchmarks.frontier", argv), args.out)
    plot(results, args.out.with_suffix(".png"), args.world)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
