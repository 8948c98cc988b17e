"""Memory control flags end to end on CPU (the sampler's chunking and checkpointing: tests/test_sampler.py; the
CUDA calibration of --memory-target-gb: tests/test_cuda.py)."""

from __future__ import annotations

import json

from engine.run import main
from tests.conftest import run_main


def test_memory_flags_run_and_the_target_is_a_warning_on_cpu(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_main(main, world.argv(run_dir, "--grad-chunk", "3", "--grad-checkpointing",
                                               "--memory-target-gb", "0.5"), capsys)
    assert code == 0, err
    assert "--memory-target-gb is measured only on CUDA; on cpu --grad-chunk 3 is used as given" in err
    config = json.loads((run_dir / "config.json").read_text())
    assert config["grad_chunk"] == 3 and config["grad_checkpointing"] and config["memory_target_gb"] == 0.5
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["images"] == 16 and summary["skipped_latent_steps"] == 0
