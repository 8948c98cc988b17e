"""DM-KD's second finding, tested with and without teacher guidance: are weaker teachers better teachers?

    python -m benchmarks.teacher_strength --seeds 0 1 2 --epochs 0.1 0.2 0.5 --images 300 --student-steps 300 \
        --extra --sampler-steps 10
    python -m benchmarks.teacher_strength --world fashion ...   # -> benchmarks/results/teacher_strength_fashion.json

Teachers of one family (``--arch``, the default teacher's ``convnet2-w32``) at several strengths, taken as
checkpoints of different training lengths (the weakest a few accuracy points below the strongest), trained on the
world's teacher data (MNIST trainval; Fashion-MNIST half A, never the prior's half), each distilled into the same
student by ``dmkd`` and by ours at one budget. Reports student accuracy against teacher accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
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
from engine.config import WORLDS

TEACHER_SPLIT = {"digits": "trainval", "fashion": "half-a"}  # the data each world's committed teacher learnt from


def train_teacher(arch: str, epochs: float, out: Path, reuse: bool, world: str = "digits") -> dict:
    meta = out.with_suffix(".json")
    if not (reuse and meta.exists()):
        subprocess.run([sys.executable, "-m", "engine.train_teacher", "--arch", arch, "--dataset",
                        WORLDS[world]["dataset"], "--split", TEACHER_SPLIT[world], "--epochs", str(epochs),
                        "--out", str(out)], check=True, stderr=subprocess.DEVNULL)
    return json.loads(meta.read_text())


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in results["students"].items():
        xs = [100 * results["teachers"][k]["test_accuracy"] for k in rows]
        ys = [100 * r["last_mean_std"]["mean"] for r in rows.values()]
        es = [100 * r["last_mean_std"]["std"] for r in rows.values()]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    ax.set_xlabel("teacher test accuracy (%)")
    ax.set_ylabel("student test accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = budget_parser(__doc__, images=1000, student_steps=1000, runs=None, out=None)
    add_world_flag(parser)
    parser.add_argument("--epochs", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    parser.add_argument("--arch", default="convnet2-w32", help="the teachers' family (the default teacher's)")
    parser.add_argument("--methods", nargs="+", default=["dmkd", "diffdfkd"], choices=["dmkd", "diffdfkd"])
    args = parser.parse_args(argv)
    world_paths(args, "teacher_strength")
    budget = budget_flags(args)
    results = {"teachers": {}, "students": {m: {} for m in args.methods},
               "budget": budget_record(args)}
    jobs = []
    for epochs in args.epochs:
        name = f"teacher-e{epochs:g}".replace(".", "p")  # no dot: the checkpoint path gets a suffix
        path = args.runs / name
        meta = train_teacher(args.arch, epochs, path, args.reuse, args.world)
        results["teachers"][name] = {"arch": args.arch, "epochs": epochs, "test_accuracy": meta["test_accuracy"]}
        teacher = ["--teacher", str(path.with_suffix(".safetensors"))]
        jobs += [(f"{method} {name}", ["--method", method, *teacher, "--seed", str(s), *budget],
                  args.runs / f"{method}-{name}-s{s}") for method in args.methods for s in args.seeds]
    summaries = iter(run_engines(jobs, args.reuse, args.jobs))
    for name in results["teachers"]:
        for method in args.methods:
            results["students"][method][name] = seed_rows([next(summaries) for _ in args.seeds], args.seeds)
    write_results(results | run_metadata("benchmarks.teacher_strength", argv), args.out)
    plot(results, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
