"""The run directory's lifecycle under faults (issues 17 and 20): checkpoints on a clock, resume without duplicate
metrics, a lock against a second process, a full disk, file modes, and starts that fail without touching the run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import engine.checkpoints
import engine.loop
import engine.outputs
import engine.stopping
from engine.checkpoints import DiskFull, atomic_save_safetensors, atomic_write_json
from engine.outputs import RunOutputs
from engine.run import main
from tests.conftest import run_main

ROOT = Path(__file__).resolve().parents[1]


def flat_student(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A student for 8x8 inputs: it cannot take the 28 px teacher input (fails at its first forward)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 8 * 8, num_classes))


class Crash(Exception):
    """Stands in for a kill inside the loop."""


def crash_at_student_step(monkeypatch, n: int) -> None:
    real = engine.loop.student_step
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.loop, "student_step", crashing)


def crashed_run(world, run_dir: Path, monkeypatch, *extra: str, at: int = 5) -> None:
    crash_at_student_step(monkeypatch, at)
    with pytest.raises(Crash):
        main(world.argv(run_dir, *extra))
    monkeypatch.undo()


def run(world, run_dir: Path, capsys, *extra: str) -> tuple[int, str]:
    code, _, err = run_main(main, world.argv(run_dir, *extra), capsys)
    return code, err


def ok(world, run_dir: Path, capsys, *extra: str) -> None:
    code, err = run(world, run_dir, capsys, *extra)
    assert code == 0, err


def refused(world, run_dir: Path, capsys, *extra: str, match: str) -> str:
    code, err = run(world, run_dir, capsys, *extra)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and match in lines[-1], lines[-1]
    return lines[-1]


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["student_step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


# --- issue 20 --------------------------------------------------------------------------------------------------------
def test_checkpoint_on_the_wall_clock(world, tmp_path, monkeypatch):
    """Ticks are too few for --checkpoint-every (as in the default run); the clock still writes checkpoints."""
    crashed_run(world, tmp_path / "clock", monkeypatch, "--checkpoint-every", "1000", "--checkpoint-minutes", "1e-9")
    assert 0 < torch.load(tmp_path / "clock" / "checkpoint.pt", weights_only=False)["state"]["student_step"] < 8
    crashed_run(world, tmp_path / "ticks", monkeypatch, "--checkpoint-every", "1000", "--checkpoint-minutes", "0")
    assert not (tmp_path / "ticks" / "checkpoint.pt").exists()


def test_resume_before_the_first_checkpoint_starts_from_scratch(world, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    crashed_run(world, run_dir, monkeypatch, "--checkpoint-every", "1000", "--checkpoint-minutes", "0")
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.jsonl"}
    assert not (run_dir / "checkpoint.pt").exists()
    code, err = run(world, run_dir, capsys, "--resume")
    assert code == 0, err
    assert "has no checkpoint yet: the run starts from scratch" in err
    assert steps(run_dir) == [2, 4, 6, 8]  # the lines of the dead attempt are gone


def test_resume_logs_each_step_once(world, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    crashed_run(world, run_dir, monkeypatch, "--checkpoint-every", "3", at=7)  # killed after metrics past the ckpt
    at = torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]["student_step"]
    assert max(steps(run_dir)) > at  # lines the resumed run will write again
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"student_step": 6, "tick"')  # and a partial last line of a killed write
    ok(world, run_dir, capsys, "--checkpoint-every", "3", "--resume")
    assert steps(run_dir) == [2, 4, 6, 8]


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds run_dir's lock, as a running run does."""
    run_dir.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.truncate(0); f.write(f'{os.getpid()}\\n'); f.flush(); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_locked_run_dir_is_refused(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    ok(world, run_dir, capsys, "--student-steps", "2")
    before = snapshot(run_dir)
    holder = hold_lock(run_dir)
    try:
        for flags in (["--overwrite"], ["--resume", "--student-steps", "4"]):
            line = refused(world, run_dir, capsys, "--student-steps", "2", *flags, match="is in use by another run")
            assert f"process {holder.pid}" in line
        assert snapshot(run_dir) | {".lock": b""} == before | {".lock": b""}  # --overwrite deleted nothing
        fresh = tmp_path / "fresh"
        fresh_holder = hold_lock(fresh)
        try:
            refused(world, fresh, capsys, match="is in use by another run")
            assert [p.name for p in fresh.iterdir()] == [".lock"]
        finally:
            fresh_holder.kill()
            fresh_holder.wait()
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead: its lock file (with its PID) stays, but the kernel released the lock.
    assert (run_dir / ".lock").read_text().strip() == str(holder.pid)
    ok(world, run_dir, capsys, "--student-steps", "2", "--overwrite")
    assert (run_dir / ".lock").read_text().strip() == str(os.getpid())


def test_a_filesystem_without_locks_runs_with_a_warning(world, tmp_path, capsys, monkeypatch):
    """flock fails with ENOLCK on some NFS mounts: the run goes on, unguarded, and says so (the run's own log
    handler replaces pytest's, so the warning is read from stderr)."""
    import engine.outputs

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(engine.outputs.fcntl, "flock", no_locks)
    run_dir = tmp_path / "nfs"
    code, err = run(world, run_dir, capsys, "--student-steps", "2")
    assert code == 0, err
    assert (run_dir / "student.safetensors").exists()
    assert "cannot lock" in err and os.strerror(errno.ENOLCK) in err, err


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4304"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_full_disk_keeps_the_last_checkpoint(world, tmp_path, capsys, monkeypatch, failure):
    run_dir = tmp_path / "run"
    real_save, saves = torch.save, []

    def filling_save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the second checkpoint finds the disk full, part-way through the write
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(engine.checkpoints.torch, "save", filling_save)
    line = refused(world, run_dir, capsys, "--checkpoint-every", "2", match=f"no space left on {run_dir} (needs about")
    assert "MB per checkpoint" in line
    monkeypatch.undo()
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)  # the first one, whole
    assert checkpoint["state"]["tick"] == 2
    assert not list(run_dir.glob(".*.tmp"))


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.outputs, "open", full, raising=False)
    with pytest.raises(DiskFull, match=r"no space left on .* \(writing metrics.jsonl\)"):
        RunOutputs(tmp_path).log({"student_step": 1})


def test_outputs_get_the_usual_file_mode(tmp_path):
    """safetensors writes its own temp file (0600) and renames it over ours: the mode is set after the write."""
    atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "student.safetensors")
    atomic_write_json({}, tmp_path / "config.json")
    usual = 0o666 & ~engine.checkpoints._umask()
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"student.safetensors": usual,
                                                                               "config.json": usual}


# --- issue 17 --------------------------------------------------------------------------------------------------------
@pytest.fixture
def finished(world, tmp_path, capsys) -> Path:
    run_dir = tmp_path / "old"
    ok(world, run_dir, capsys)
    return run_dir


def test_overwrite_with_a_run_that_fails_late_keeps_the_old_run(world, finished, capsys):
    """The student fails at its first forward: the run is refused before the old one is touched."""
    before = snapshot(finished)
    refused(world, finished, capsys, "--overwrite", "--student", "tests.test_run_dir:flat_student",
            match="tests.test_run_dir:flat_student")
    assert snapshot(finished) == before


def test_a_rejected_resume_writes_nothing(world, finished, capsys):
    before = snapshot(finished)
    refused(world, finished, capsys, "--resume", "--student", "convnet-w16", match="--student convnet-w8 (now "
            "convnet-w16)")
    checkpoint = torch.load(finished / "checkpoint.pt", weights_only=False)
    for broken, match in [({}, "is not a checkpoint of this engine"),
                          (checkpoint | {"ranks": checkpoint["ranks"] * 2}, "was written by 2 processes")]:
        torch.save(broken, finished / "checkpoint.pt")
        refused(world, finished, capsys, "--resume", match=match)
        assert snapshot(finished) == before | {"checkpoint.pt": (finished / "checkpoint.pt").read_bytes()}


def test_resume_refuses_a_different_run(world, finished, capsys):
    before = snapshot(finished)
    line = refused(world, finished, capsys, "--resume", "--seed", "1", "--images", "20", "--optimizer", "sgd",
                   match="--resume: the run in")
    assert "--images 16 (now 20), --optimizer adam (now sgd), --seed 0 (now 1)" in line
    refused(world, finished, capsys, "--resume", "--student-steps", "6", match="--student-steps 8 (now 6; it may "
            "only grow)")
    assert snapshot(finished) == before
    # What README lists as safe to change: a longer run (extends a finished one), other intervals, export.
    ok(world, finished, capsys, "--resume", "--student-steps", "12", "--log-every", "4", "--eval-every", "6",
       "--checkpoint-every", "3", "--export")
    assert steps(finished) == [2, 4, 6, 8, 12]
    assert json.loads((finished / "summary.json").read_text())["student_steps"] == 12


@pytest.fixture
def ctrl_c():
    """SIGINT as an interactive shell delivers it (Python's KeyboardInterrupt handler), whatever this test process
    inherited: a script's background job (`pytest &`) starts with SIGINT ignored, which the engine respects."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_an_ignored_sigint_stays_ignored():
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with engine.stopping.stop_on_signals() as request:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # the other one is still watched
            os.kill(os.getpid(), signal.SIGINT)
        assert request.signum == 0 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_sigint_writes_a_checkpoint_then_resume_continues(world, tmp_path, monkeypatch, capsys, ctrl_c):
    run_dir = tmp_path / "run"
    real, calls = engine.loop.student_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, mid-tick
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.loop, "student_step", interrupted)
    code, err = run(world, run_dir, capsys, "--checkpoint-every", "1000", "--checkpoint-minutes", "0")
    monkeypatch.undo()
    assert code == 130 and "Traceback" not in err, err
    assert "SIGINT: stopping after this tick" in err and "checkpoint written: --resume continues" in err
    assert 3 <= torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]["student_step"] < 8
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    ok(world, run_dir, capsys, "--checkpoint-every", "1000", "--checkpoint-minutes", "0", "--resume")
    assert steps(run_dir) == [2, 4, 6, 8]


def test_a_second_sigint_stops_at_once_without_a_traceback(world, tmp_path, monkeypatch, capsys, ctrl_c):
    run_dir = tmp_path / "run"
    real, calls = engine.loop.student_step, []

    def interrupted_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # after the checkpoint of step 4
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # impatient: the second one before the tick ends
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.loop, "student_step", interrupted_twice)
    code, err = run(world, run_dir, capsys)
    monkeypatch.undo()
    assert code == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted at once: the last checkpoint written stays" in err
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]["student_step"] == 4
    assert not (run_dir / "summary.json").exists()
    ok(world, run_dir, capsys, "--resume")
    assert steps(run_dir) == [2, 4, 6, 8]


@pytest.mark.slow
def test_sigterm_stops_a_real_process_cleanly(world, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "engine.run", *world.argv(run_dir), "--images", "48", "--student-steps", "60",
               "--checkpoint-every", "1000", "--checkpoint-minutes", "0", "--log-every", "5"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:  # the loop is running
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert 0 < torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]["student_step"] < 60
    assert not (run_dir / "summary.json").exists()
    done = subprocess.run([*command, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert steps(run_dir) == list(range(5, 61, 5))
    assert json.loads((run_dir / "summary.json").read_text())["student_steps"] == 60
