"""Benchmarks are long runs, not tests; here only their command lines and pure helpers are checked."""

import importlib

import pytest

NAMES = ["accuracy", "ablations", "frontier", "fidelity", "teacher_strength", "guidance", "throughput", "step_costs",
         "memory", "students", "flops"]


@pytest.mark.parametrize("name", NAMES)
def test_benchmark_help(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "python -m benchmarks" in capsys.readouterr().out


def test_frontier_counts_unet_forwards_per_image():
    from benchmarks.frontier import unet_forwards_per_image

    assert unet_forwards_per_image(["--sampler-steps", "10"]) == 10 * 4  # forward + backward (2) + recomputed
    assert unet_forwards_per_image(["--sampler-steps", "10", "--grad-mode", "detached", "--reuse-eps"]) == 10
    assert unet_forwards_per_image(["--sampler-steps", "10", "--guide-every", "2"]) == 5 * 4 + 5


def test_seed_rows_aggregate_last_and_best():
    from benchmarks.engine_runs import seed_rows

    row = seed_rows([{"student_acc": 0.5, "best_student_acc": 0.6}, {"student_acc": 0.7, "best_student_acc": 0.7}],
                    [0, 1])
    assert row["last_mean_std"]["mean"] == pytest.approx(0.6) and row["best"] == [0.6, 0.7]
