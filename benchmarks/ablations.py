"""Ablations of ours (online DiffDFKD) on the default world: each component off in turn, same budget and seeds.

    python -m benchmarks.ablations --seeds 0 --images 300 --student-steps 300 --extra --sampler-steps 10
"""

from __future__ import annotations

from benchmarks.common import RESULTS_DIR, run_metadata, write_results
from benchmarks.engine_runs import budget_flags, budget_parser, budget_record, run_engines, seed_rows

VARIANTS = {
    "full": [],
    "no-bn": ["--no-bn"],
    "no-cls": ["--no-cls"],
    "no-adv": ["--no-adv"],
    "no-cutmix": ["--no-cutmix"],
    "no-inpaint": ["--no-inpaint"],
    "no-msarc": ["--no-msarc"],
    "offline": ["--schedule", "offline"],
}


def main(argv: list[str] | None = None) -> int:
    parser = budget_parser(__doc__, images=2000, student_steps=2000, runs="runs/bench-ablations",
                           out=RESULTS_DIR / "ablations.json")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    budget = budget_flags(args)
    results = {"variants": {}, "budget": budget_record(args)}
    jobs = [(name, [*VARIANTS[name], "--seed", str(s), *budget], args.runs / f"{name}-s{s}")
            for name in args.variants for s in args.seeds]
    summaries = iter(run_engines(jobs, args.reuse, args.jobs))
    for name in args.variants:
        runs = [next(summaries) for _ in args.seeds]
        results["variants"][name] = seed_rows(runs, args.seeds) | {"flags": VARIANTS[name]}
        m = results["variants"][name]["last_mean_std"]
        print(f"{name:12s} {100 * m['mean']:6.2f} ± {100 * m['std']:.2f}", flush=True)
    write_results(results | run_metadata("benchmarks.ablations", argv), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
