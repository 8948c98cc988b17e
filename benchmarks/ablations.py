"""Ablations of ours (online DiffDFKD) on the default world: each component off in turn, same budget and seeds.

    python -m benchmarks.ablations --seeds 0 --images 300 --student-steps 300 --extra --sampler-steps 10
"""

from __future__ import annotations

from benchmarks.common import RESULTS_DIR, run_metadata, write_results
from benchmarks.engine_runs import budget_parser, budget_record, run_variants

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
    results = {"variants": run_variants(args, VARIANTS, args.variants), "budget": budget_record(args)}
    write_results(results | run_metadata("benchmarks.ablations", argv), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
