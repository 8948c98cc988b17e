"""Ablations of ours (online DiffDFKD) on the default world: each component off in turn, same budget and seeds.

    python -m benchmarks.ablations --seeds 0 1 2 --images 2000 --student-steps 2000
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import RESULTS_DIR, run_metadata, write_results
from benchmarks.engine_runs import run_engine, seed_rows

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--student-steps", type=int, default=2000)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-ablations"))
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "ablations.json")
    args = parser.parse_args(argv)
    budget = ["--images", str(args.images), "--student-steps", str(args.student_steps)]
    results = {"variants": {}, "budget": {"images": args.images, "student_steps": args.student_steps}}
    for name in args.variants:
        runs = [run_engine(name, [*VARIANTS[name], *budget, "--seed", str(s)], args.runs / f"{name}-s{s}", args.reuse)
                for s in args.seeds]
        results["variants"][name] = seed_rows(runs, args.seeds) | {"flags": VARIANTS[name]}
        m = results["variants"][name]["last_mean_std"]
        print(f"{name:12s} {100 * m['mean']:6.2f} ± {100 * m['std']:.2f}", flush=True)
    write_results(results | run_metadata("benchmarks.ablations", argv), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
