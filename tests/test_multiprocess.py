"""Two CPU processes (gloo) through torch's launcher: sharded generation, DDP student, one run directory."""

import json
import os
import subprocess
import sys

import pytest


def failure(done: subprocess.CompletedProcess) -> str:
    """What a failed launch said: every rank's error lines (the launcher's own traceback comes last and hides
    them), then the tail of stderr."""
    marks = ("Error", "error", "terminate", "what()", "Abort", "Signal")
    errors = [line for line in done.stderr.splitlines() if any(mark in line for mark in marks)]
    return "\n".join(errors[:40]) + "\n---\n" + done.stderr[-1500:]


@pytest.mark.slow
def test_two_process_run_matches_a_one_process_run(world, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    done = subprocess.run([*launch, "-m", "engine.run", *world.argv(two), "--export"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, failure(done)
    one = tmp_path / "one"
    done = subprocess.run([sys.executable, "-m", "engine.run", *world.argv(one), "--export"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, failure(done)

    s2, s1 = (json.loads((d / "summary.json").read_text()) for d in (two, one))
    assert s2["processes"] == 2 and s1["processes"] == 1
    assert s2["images"] == s1["images"] == 16 and s2["student_steps"] == s1["student_steps"] == 8
    assert 0.0 <= s2["student_acc"] <= 1.0
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # the same outputs
    import torch

    labels = torch.load(two / "synthetic" / "labels.pt", weights_only=False)
    assert sorted(labels["seeds"].tolist()) == list(range(16))  # each rank made its own disjoint seeds, none twice
    assert not list(two.glob(".*.tmp")) and len((two / "metrics.jsonl").read_text().splitlines()) == 4  # main only


@pytest.mark.slow
def test_two_process_class_focus_shares_one_set_of_class_probabilities(world, tmp_path):
    """--class-focus under DDP (the per-class windows are summed over processes at each metrics line and at
    checkpoints): it completes, logs shares that sum to one, and the summary counts every rank's images."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run_dir = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534"]
    flags = ["--class-focus", "4", "--images", "24", "--checkpoint-every", "3"]
    done = subprocess.run([*launch, "-m", "engine.run", *world.argv(run_dir, *flags)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, failure(done)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(sum(line["class_probs"]) == pytest.approx(1.0, abs=1e-3) for line in lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sum(summary["images_per_class"]) == pytest.approx(24)
