"""Run the engine from a benchmark exactly as a user would (``python -m engine.run ...`` in a subprocess), keep
each run directory so every number traces back to its config.json and metrics.jsonl, and aggregate seeds."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_engine(name: str, flags: list[str], run_dir: Path, reuse: bool = False) -> dict:
    """The run's summary.json (student_acc, best_student_acc, wall_seconds, images, ...)."""
    summary = run_dir / "summary.json"
    if reuse and summary.exists():
        return json.loads(summary.read_text())
    command = [sys.executable, "-m", "engine.run", "--run-dir", str(run_dir), "--overwrite", *flags]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: python {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def seed_rows(runs: list[dict], seeds: list[int]) -> dict:
    """Per-seed last/best accuracies and their mean ± std (last-step accuracy is the headline)."""
    last = [r["student_acc"] for r in runs]
    row = {"seeds": seeds, "last": last, "last_mean_std": mean_std(last)}
    if runs and "best_student_acc" in runs[0]:
        row["best"] = [r["best_student_acc"] for r in runs]
        row["best_mean_std"] = mean_std(row["best"])
        row["wall_seconds"] = [r.get("wall_seconds") for r in runs]
    return row
