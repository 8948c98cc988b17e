"""Bad input to ``python -m engine.run``: one ``error: ...`` line on stderr, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.run import main
from tests.conftest import run_main, save_classifier

ROOT = Path(__file__).resolve().parents[1]


def fails_cleanly(argv: list[str], capsys, match: str) -> str:
    """Run ``main``; check the one-line error and return it."""
    code, out, err = run_main(main, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert match in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "run"
    yield path
    assert not path.exists(), "a refused run wrote its run dir"


def test_missing_teacher_checkpoint(world, run_dir, capsys):
    fails_cleanly(world.argv(run_dir, "--teacher", str(run_dir.parent / "nope.safetensors")), capsys,
                  "checkpoint not found")


def test_corrupt_teacher_checkpoint(world, run_dir, capsys, tmp_path):
    corrupt = tmp_path / "teacher.safetensors"
    data = world.teacher.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])  # truncated, as by an interrupted copy
    shutil.copy(world.teacher.with_suffix(".json"), corrupt.with_suffix(".json"))
    fails_cleanly(world.argv(run_dir, "--teacher", str(corrupt)), capsys, "cannot read checkpoint")


def test_checkpoint_does_not_fit_the_architecture(world, run_dir, capsys):
    fails_cleanly(world.argv(run_dir, "--teacher-arch", "convnet-w16"), capsys, "does not fit 'convnet-w16'")
    fails_cleanly(world.argv(run_dir, "--teacher-arch", "resnet20"), capsys, "does not fit 'resnet20'")


@pytest.mark.parametrize("arch, match", [("no-such-net", "unknown architecture"),
                                         ("no_such_module:make", "cannot import module")])
def test_unknown_teacher_architecture(world, run_dir, capsys, arch, match):
    fails_cleanly(world.argv(run_dir, "--teacher-arch", arch), capsys, match)


def test_teacher_without_architecture(world, run_dir, capsys, tmp_path):
    bare = tmp_path / "bare.safetensors"
    shutil.copy(world.teacher, bare)  # no sidecar
    fails_cleanly(world.argv(run_dir, "--teacher", str(bare)), capsys, "cannot tell the architecture")


def test_corrupt_teacher_sidecar(world, run_dir, capsys, tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(world.teacher, teacher)
    teacher.with_suffix(".json").write_text('{"arch": "convnet-w8", ')
    fails_cleanly(world.argv(run_dir, "--teacher", str(teacher)), capsys, "cannot read the sidecar")


def test_teacher_classes_differ_from_the_dataset(world, run_dir, capsys, tmp_path):
    from models.registry import build_classifier

    three = save_classifier(build_classifier("convnet-w8", 3, 1), tmp_path / "three", "convnet-w8", ("a", "b", "c"))
    fails_cleanly(world.argv(run_dir, "--teacher", str(three)), capsys, "has 3 classes but dataset 'digits' has 10")


def test_untrained_teacher(world, run_dir, capsys):
    fails_cleanly(world.argv(run_dir, "--teacher", "convnet-w8"), capsys, "untrained architecture")


def test_missing_prior_folder(world, run_dir, capsys):
    fails_cleanly(world.argv(run_dir, "--prior", str(run_dir.parent / "no-prior")), capsys, "prior folder not found")


def test_prior_that_is_not_a_diffusers_folder(world, run_dir, capsys, tmp_path):
    (tmp_path / "empty-prior").mkdir()
    fails_cleanly(world.argv(run_dir, "--prior", str(tmp_path / "empty-prior")), capsys, "not a diffusers prior")


def test_hub_id_while_offline(world, run_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails_cleanly(world.argv(run_dir, "--prior", "some-org/some-model"), capsys, "could not load hub id")


def test_prior_resolution_the_teacher_cannot_use(world, run_dir, capsys):
    fails_cleanly(world.argv(run_dir, "--prior", str(world.prior_8px)), capsys, "the prior makes 8px images")


def test_unknown_dataset(world, run_dir, capsys):
    fails_cleanly(world.argv(run_dir, "--dataset", "mnist-typo"), capsys, "unknown dataset 'mnist-typo'")


def test_missing_local_dataset(world, run_dir, capsys, tmp_path):
    fails_cleanly(world.argv(run_dir, "--dataset", "cifar10", "--data-root", str(tmp_path)), capsys,
                  "cifar10 not found")


def test_unknown_student_architecture(world, run_dir, capsys):
    fails_cleanly(world.argv(run_dir, "--student", "resnet-9000"), capsys, "neither a checkpoint file nor a known")


def test_resume_without_a_run(world, run_dir, capsys):
    fails_cleanly(world.argv(run_dir, "--resume"), capsys, "holds no run")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_existing_run_dir_is_left_alone(world, capsys, tmp_path):
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"student_step": 1}\n')
    before = snapshot(run_dir)
    fails_cleanly(world.argv(run_dir), capsys, "already holds a run; pass --resume")
    fails_cleanly(world.argv(run_dir, "--resume"), capsys, "has no checkpoint.pt")
    # --overwrite with a bad flag must not delete the old run: the world is checked before anything is replaced.
    fails_cleanly(world.argv(run_dir, "--overwrite", "--student", "nope"), capsys, "neither a checkpoint")
    assert snapshot(run_dir) == before


def test_run_dir_under_a_file(world, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    fails_cleanly(world.argv(blocker / "sub"), capsys, "cannot create run directory")
    fails_cleanly(world.argv(blocker), capsys, "is a file")
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through chmod 0o500")
def test_unwritable_run_dir(world, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        fails_cleanly(world.argv(locked / "run"), capsys, "cannot create run directory")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_teacher_without_batchnorm_disables_the_bn_term(world, capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run_main(main, world.argv(run_dir, "--teacher", str(world.nobn_teacher), "--student-steps", "2",
                                             "--images", "8", "--no-msarc"), capsys)
    assert code == 0, err
    assert "no BatchNorm layers: the BN-statistics term is disabled" in err
    config = json.loads((run_dir / "config.json").read_text())
    assert config["bn"] == 0.0 and config["teacher_arch"] == "tests.conftest:no_bn_classifier"
    assert (run_dir / "student.safetensors").exists()


def test_errors_from_a_real_process(world, tmp_path):
    """The same contract seen from a shell: exit status 2 and exactly one stderr line."""
    argv = world.argv(tmp_path / "run", "--teacher", str(tmp_path / "missing.safetensors"))
    done = subprocess.run([sys.executable, "-m", "engine.run", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("error: checkpoint not found") and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == "" and not (tmp_path / "run").exists()


def test_resume_from_a_corrupt_checkpoint(world, capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    fails_cleanly(world.argv(run_dir, "--resume"), capsys, "it is corrupt: start anew with --overwrite")
