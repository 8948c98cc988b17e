"""How recognisable is a world's prior before any teacher steers it? The teacher's agreement with the target class
on unguided prior samples (DM-KD's images: ``engine.synthesize --method dmkd``, the run's sampler defaults), per
class, against chance (1 / classes) and against the teacher's accuracy on real images it never trained on.

    python -m benchmarks.prior_fidelity --world fashion --per-class 100   # -> results/prior_fidelity_fashion.json

The synthetic set is made by ``python -m engine.synthesize`` in a subprocess, as a user would, and kept under
``--runs``; extra ``engine.synthesize`` flags (``--sampler-steps 25``, ``--guidance-scale 1``) go after ``--extra``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, run_metadata, write_results
from engine.config import WORLDS


def agreement(folder: Path) -> dict:
    """Fraction of the set whose teacher class (cached logits) is its target class, overall and per class."""
    saved = torch.load(folder / "labels.pt", weights_only=True)
    predicted, target = saved["teacher_logits"].argmax(1), saved["targets"].argmax(1)
    names = saved["class_names"]
    per_class = {names[c]: round((predicted[target == c] == c).float().mean().item(), 4)
                 for c in range(len(names)) if (target == c).any()}
    return {"teacher_agreement": round((predicted == target).float().mean().item(), 4), "per_class": per_class,
            "images": len(target), "chance": round(1 / len(names), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=list(WORLDS), default="fashion")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-prior-fidelity"))
    parser.add_argument("--reuse", action="store_true", help="reuse a finished synthetic set under --runs")
    parser.add_argument("--out", type=Path, default=None, help="default: results/prior_fidelity_WORLD.json")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags for engine.synthesize")
    args = parser.parse_args(argv)
    world = WORLDS[args.world]
    folder = args.runs / f"{args.world}-dmkd-s{args.seed}"
    if not (args.reuse and (folder / "labels.pt").exists()):
        subprocess.run([sys.executable, "-m", "engine.synthesize", "--world", args.world, "--method", "dmkd",
                        "--images", str(10 * args.per_class), "--seed", str(args.seed), "--out", str(folder),
                        "--overwrite", *args.extra], check=True, stderr=subprocess.DEVNULL)
    real = json.loads(subprocess.run([sys.executable, "-m", "engine.evaluate", "--teacher", world["teacher"],
                                      "--dataset", world["dataset"]], check=True, capture_output=True,
                                     text=True).stdout)
    synthesis = json.loads((folder / "synthesis.json").read_text())
    results = {"world": args.world, "unguided": agreement(folder), "teacher_real_test_accuracy": real["accuracy"],
               "synthesis": {k: synthesis["config"][k] for k in ("sampler_steps", "guidance_scale", "scheduler")}
               | {k: synthesis[k] for k in ("prior", "teacher_checkpoint", "command", "seconds")},
               "extra_flags": args.extra}
    out = args.out or RESULTS_DIR / f"prior_fidelity_{args.world}.json"
    write_results(results | run_metadata("benchmarks.prior_fidelity", argv), out)
    print(json.dumps(results["unguided"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
