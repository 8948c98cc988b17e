"""SIGKILL a run at random moments, then ``--resume``: no partial file under a final name, and the run completes
with its whole budget (bounded trials; each run takes a few seconds)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

FINAL_FILES = ("config.json", "checkpoint.pt", "student.safetensors", "student.json", "summary.json", "samples.png")


def assert_complete_files(run_dir):
    """Every file under its final name is whole: JSON parses, checkpoints and weights load."""
    from safetensors.torch import load_file

    for name in FINAL_FILES:
        path = run_dir / name
        if not path.exists():
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=False)
        elif path.suffix == ".safetensors":
            load_file(str(path))


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(world, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    budget = ["--images", "48", "--student-steps", "60", "--checkpoint-every", "1", "--log-every", "5"]
    rng = random.Random(0)
    for trial in range(3):
        run_dir = tmp_path / f"run{trial}"
        command = [sys.executable, "-m", "engine.run", *world.argv(run_dir), *budget]
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 6.0))  # start-up takes ~2 s: kills land during setup or mid-loop
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_complete_files(run_dir)
        resume = ["--resume"] if (run_dir / "checkpoint.pt").exists() else ["--overwrite"]
        done = subprocess.run([*command, *resume], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert_complete_files(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["student_steps"] == 60 and summary["images"] >= 48
        assert not list(run_dir.glob(".*.tmp"))
