"""Levers for ours (online DiffDFKD) against its own baseline, issue 16: each variant at the default budget over
the same seeds, in either world. The baseline row is the default run; every other row changes one thing (the bn-0.1
rows: against the default before 2026-12-04, α = 0.1; the bn-1 rows: both worlds' α before 2026-12-05; bn-0.5: the
fashion world's for a sitting of that day).

    python -m benchmarks.levers --jobs 2 --variants baseline kd-tail-0.5 replay-balance-4
    python -m benchmarks.levers --world fashion --jobs 2      # -> benchmarks/results/levers_fashion.json
    python -m benchmarks.levers --base '--sampler-steps 15 --guide-every 1' --reuse \
        --runs benchmarks/results/records/levers             # the digits rows measured at 15 steps
    python -m benchmarks.levers --equal-compute --variants guide-every-3 --runs runs/levers-eqc  # equal compute

Replay exposure (lever 1): uniform draws from a growing buffer show the first images far more often than the
last; ``--replay-balance P`` draws with probability ∝ (1 + times drawn)^-P, ``--kd-tail F`` keeps a share F of
the student steps for after the last image, ``--min-buffer`` waits for a deeper buffer before training. Each row
reports the mean draws of the oldest and the newest tenth of the images beside its accuracy. The other levers:
L_adv (off, offline with and without it, JS instead of KL), the sampler budget (25 steps guided every 2nd, a
guidance ramp over the timesteps), a grid around α, β, η, and
``--class-focus`` (the classes of new images follow the student's per-class KD loss; online only), and
``--cls-boundary`` (L_cls aims each image partly at its nearest other class: images near the class boundary).

``--equal-compute`` runs each variant with the images that the baseline's counted FLOPs (``benchmarks.compute``) buy
it at the same student steps, instead of ``--images``; each row records its image count and counted compute.
"""

from __future__ import annotations

import shlex

from benchmarks.common import run_metadata, write_results
from benchmarks.compute import cost_row, images_at_equal_compute, method_cost, run_flops
from benchmarks.engine_runs import (
    add_world_flag,
    budget_flags,
    budget_parser,
    budget_record,
    run_variants,
    world_paths,
)

VARIANTS = {
    "baseline": [],  # the default run: digits α = 2 since 2026-12-05 (1 from 2026-12-04) and 25 sampler steps
    # guided every 2nd since 2026-12-05 (15, every step before: --base); fashion α = 0.25 since 2026-12-05; the
    # replay tail 0.5 in both worlds since 2026-12-06 (rows before: --base '--kd-tail 0')
    # 1. replay exposure
    "no-tail": ["--kd-tail", "0"],
    "kd-tail-0.25": ["--kd-tail", "0.25"],
    "kd-tail-0.5": ["--kd-tail", "0.5"],
    "kd-tail-0.75": ["--kd-tail", "0.75"],  # the tail's trend: as F → 1 the online loop turns into offline
    "replay-balance-4": ["--replay-balance", "4"],
    "replay-balance-4-tail-0.25": ["--replay-balance", "4", "--kd-tail", "0.25"],
    "min-buffer-600": ["--min-buffer", "600"],
    # 2. the adversarial term
    "no-adv": ["--no-adv"],
    "offline": ["--schedule", "offline"],
    "offline-no-adv": ["--schedule", "offline", "--no-adv"],
    "adv-js": ["--divergence", "js"],
    "adv-3": ["--adv", "3"],  # γ ×3: L_adv is the one term that targets the current student, i.e. needs online
    "offline-adv-3": ["--schedule", "offline", "--adv", "3"],
    # 3. the sampler budget: 25 steps guided every 2nd, 64 UNet forward-equivalents per image against 15 guided
    # steps' 60 (x 4; BENCHMARKS.md, the sampler frontier); the digits default since 2026-12-05
    "steps-25-every-2": ["--sampler-steps", "25", "--guide-every", "2"],
    "steps-25-every-2-tail-0.5": ["--sampler-steps", "25", "--guide-every", "2", "--kd-tail", "0.5"],  # 1 + 3
    "offline-steps-25-every-2": ["--schedule", "offline", "--sampler-steps", "25", "--guide-every", "2"],
    "guidance-ramp-0.5": ["--guidance-ramp", "0.5"],  # η from 0.5η at the noisiest step to 1.5η at the last
    # a cheaper guided step at the 25-step sampler: the teacher steers 9 (every 3rd) or 7 (every 4th) of 25 steps;
    # run them with --equal-compute (digits default: 2,391 / 2,651 images)
    "guide-every-3": ["--guide-every", "3"],
    "guide-every-4": ["--guide-every", "4"],
    # the best guided cell of the fashion fidelity grid (300 images, 3 seeds: 74.0% against 63.7 at 15 steps, CFG 4);
    # a third of the default's UNet work per image
    "steps-5-cfg-4": ["--sampler-steps", "5", "--guidance-scale", "4"],
    # 4. guidance strength per term (α = 1, fashion 0.25; β = 10, η = 0.1 by default). A 100-image screen
    # (benchmarks.bn_sweep: 15 steps, no CutMix) took the BN distance from 73 (α = 0.1) to 48 (0.3) and 24 (1.0; real
    # MNIST 18) at 98-99% teacher agreement; α = 3 broke the strokes (52%)
    "bn-0.3": ["--bn", "0.3"], "bn-0.5": ["--bn", "0.5"], "bn-2": ["--bn", "2"],
    "cls-5": ["--cls", "5"], "cls-20": ["--cls", "20"],
    # the fashion screens of 2026-12-06 ranked β = 5 > 10 > 20 and η = 0.05 > 0.1 > 0.2 on seed 0: further down, and
    # each in the other schedule (β and η steer offline's guidance alike, so a gentler step must beat offline at it)
    "cls-2.5": ["--cls", "2.5"], "offline-cls-5": ["--schedule", "offline", "--cls", "5"],
    "eta-0.025": ["--step-size", "0.025"], "offline-eta-0.05": ["--schedule", "offline", "--step-size", "0.05"],
    "bn-3": ["--bn", "3"],
    "eta-0.05": ["--step-size", "0.05"], "eta-0.2": ["--step-size", "0.2"],
    # the rows measured at α = 0.1, the default until 2026-12-04 (their run records keep these names)
    "bn-0.1": ["--bn", "0.1"],
    "bn-0.1-kd-tail-0.5": ["--bn", "0.1", "--kd-tail", "0.5"],
    "bn-0.1-steps-25-every-2": ["--bn", "0.1", "--sampler-steps", "25", "--guide-every", "2"],
    # the fashion rows measured at α = 1, its default until 2026-12-05 (run records renamed likewise)
    "bn-1": ["--bn", "1"],
    "bn-1-kd-tail-0.5": ["--bn", "1", "--kd-tail", "0.5"],
    "bn-1-steps-5-cfg-4": ["--bn", "1", "--sampler-steps", "5", "--guidance-scale", "4"],
    # the fashion default for a sitting of 2026-12-05 (α = 0.5; bn-0.5 above), offline
    "offline-bn-0.5": ["--schedule", "offline", "--bn", "0.5"],
    # below the fashion default: does the trend of lower α, better students go on? (with bn-0.1 above)
    "no-bn": ["--no-bn"],
    # the digits rows measured at α = 1, its default from 2026-12-04 to 2026-12-05 (run records renamed likewise)
    "offline-bn-1": ["--schedule", "offline", "--bn", "1"],
    "bn-1-steps-25-every-2": ["--bn", "1", "--sampler-steps", "25", "--guide-every", "2"],
    "bn-1-steps-25-every-2-tail-0.5": ["--bn", "1", "--sampler-steps", "25", "--guide-every", "2", "--kd-tail", "0.5"],
    # DeepInversion weights its first BN layer ×10 (low-level statistics); ours weighs every layer alike. A
    # 100-image screen (benchmarks.bn_sweep, digits): at α = 2 the BN distance goes 21.0 (×1) → 18.1 (×3; real MNIST
    # 18.2) → 31.9 (×10), at 99-100% teacher agreement
    "first-bn-3": ["--first-bn-multiplier", "3"],
    "first-bn-10": ["--first-bn-multiplier", "10"],
    # 5. the classes of new images follow the student's per-class KD loss (engine/class_focus.py): beside L_adv, the
    # one way the generator reads the current student, so the one lever only the online schedule can have
    "class-focus-1": ["--class-focus", "1"], "class-focus-2": ["--class-focus", "2"],
    # 6. images near the class boundary: L_cls's target puts 10% on each image's nearest other class. The teacher is
    # surer of the guided images that no CutMix touched than of real ones (fashion margin 0.97 against 0.88, shirts
    # 0.985 against 0.68: class_signals_fashion.json); 0.1 brings a 100-image set's near the real one, 0.3 far under
    # it. A generator-side lever, so offline gets it too
    "cls-boundary-0.1": ["--cls-boundary", "0.1"],
    "offline-cls-boundary-0.1": ["--schedule", "offline", "--cls-boundary", "0.1"],
}


def main(argv: list[str] | None = None) -> int:
    parser = budget_parser(__doc__, images=2000, student_steps=2000, runs=None, out=None)
    add_world_flag(parser)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--base", type=shlex.split, default=[],
                        help="engine flags every variant starts from, its own flags winning over them: one quoted "
                        "string, e.g. --base '--sampler-steps 15 --guide-every 1' (the digits sampler before "
                        "2026-12-05's switch, under which records/levers was measured)")
    parser.add_argument("--equal-compute", action="store_true",
                        help="each variant with the images the baseline's counted FLOPs buy it (same student steps)")
    args = parser.parse_args(argv)
    world_paths(args, "levers")
    variants = {name: [*args.base, *flags] for name, flags in VARIANTS.items()}
    images = None
    if args.equal_compute:
        budget = budget_flags(args)
        costs = {name: method_cost([*variants[name], *budget]) for name in {"baseline", *args.variants}}
        total = run_flops(costs["baseline"], args.images, args.student_steps)
        images = {name: images_at_equal_compute(costs[name], total, args.student_steps) for name in args.variants}
    rows = run_variants(args, variants, args.variants, images)
    if images:
        for name in rows:
            rows[name] |= {"images": images[name], "compute": cost_row(costs[name], images[name], args.student_steps)}
    results = {"variants": rows,
               "budget": budget_record(args) | {"base_flags": args.base, "equal_compute": args.equal_compute}}
    write_results(results | run_metadata("benchmarks.levers", argv), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
