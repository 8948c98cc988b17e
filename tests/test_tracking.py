"""Trackers (--log-with), curves.png, the image rate, samples sized to the run, the live display (issue 18)."""

from __future__ import annotations

import builtins
import io
import json
from pathlib import Path

import pytest

from engine.run import main
from engine.tracking import ImageRate, LiveDisplay, write_curves
from tests.conftest import run_main


def run_ok(world, run_dir: Path, capsys, *extra: str) -> str:
    code, _, err = run_main(main, world.argv(run_dir, *extra), capsys)
    assert code == 0, err
    return err


def test_tensorboard_event_files_read_back(world, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_ok(world, run_dir, capsys, "--log-with", "tensorboard")
    files = sorted((run_dir / "tensorboard").iterdir())
    assert files and all("tfevents" in f.name for f in files)
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]  # every event file was renamed into place
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"kd_L_kd", "kd_kl", "kd_msarc", "inv_L_inv", "inv_bn", "inv_cls", "student_acc", "images_per_s",
            "buffer_fill", "images"} <= scalars
    assert [e.step for e in events.Scalars("kd_L_kd")] == [2, 4, 6, 8]  # every metrics line, at its student step
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("student_acc")] == pytest.approx(
        [m["student_acc"] for m in metrics if "student_acc" in m])
    assert [e.step for e in events.Images("samples")] == [4, 8]  # a sample grid at every evaluation
    assert events.Images("samples")[0].width > 0
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config as text


def test_missing_tracker_package_is_one_line(world, tmp_path, capsys, monkeypatch):
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else
                        real_find_spec(name, *a))
    code, _, err = run_main(main, world.argv(tmp_path / "run", "--log-with", "wandb"), capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --log-with wandb needs the wandb package")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_without_matplotlib_the_run_says_so_once(world, tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    err = run_ok(world, tmp_path / "run", capsys, "--student-steps", "4")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert "curves.png" not in names and {"samples.png", "summary.json", "student.safetensors"} <= names
    warnings = [line for line in err.splitlines() if "matplotlib is not installed" in line]
    assert len(warnings) == 1 and "no curves.png" in warnings[0]


def test_curves_png(tmp_path):
    from PIL import Image

    lines = [{"student_step": s, "images": 4 * s, "kd_L_kd": 1 / s, "kd_kl": 0.5 / s, "inv_L_inv": 2.0 - s / 10,
              **({"student_acc": s / 10} if s % 2 == 0 else {})} for s in range(1, 9)]
    assert write_curves(lines, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (1000, 800)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20  # more than a blank canvas


def test_image_rate_over_a_window():
    rate = ImageRate(window_s=10)
    # A small run: a micro-batch of 4 finishes every other metrics line. The per-interval count would read 0 between.
    readings = [rate(t, n) for t, n in [(1, 4), (2, 4), (3, 8), (4, 8), (5, 12)]]
    assert readings[0] == 4 and all(r > 0 for r in readings)
    assert readings[-1] == pytest.approx(12 / 5)  # since the start: the run is younger than the window
    assert rate(30, 12) == 0  # nothing made for longer than the window
    assert rate(31, 16) == pytest.approx(4 / 26)  # from the newest line at least a window old (t = 5)


def test_live_display_shows_bars_accuracy_losses_and_rate():
    from rich.console import Console

    out = io.StringIO()
    display = LiveDisplay(images=16, student_steps=8, console=Console(file=out, force_terminal=True, width=110))
    with display:
        display.update({"student_step": 4, "images": 8, "buffer_fill": 0.5, "images_per_s": 3.25, "kd_L_kd": 0.25,
                        "inv_L_inv": 1.5, "student_acc": 0.875})
        display.update({"student_step": 6, "images": 12, "buffer_fill": 0.75, "images_per_s": 3.5, "kd_L_kd": 0.125,
                        "inv_L_inv": 1.25})  # no evaluation on this line
    last_frame = out.getvalue().rsplit("images", 1)[-1]
    for text in ("12/16", "student steps", "6/8", "acc", "87.50%", "L_kd", "0.125", "L_inv", "1.25", "3.5 img/s",
                 "buffer", "75%"):
        assert text in last_frame, text  # the last accuracy stays until the next evaluation


def test_plain_log_lines_off_a_terminal(world, tmp_path, capsys):
    assert LiveDisplay.create(16, 8) is None  # pytest's captured stderr is not a terminal
    err = run_ok(world, tmp_path / "run", capsys, "--student-steps", "4")
    assert "student_step=2 " in err and "student_step=4 " in err and "\x1b[" not in err  # no escape sequences


def test_offline_synthesis_reports_progress_before_any_student_step(world, tmp_path, capsys):
    """16 images in micro-batches of 4 with no student step until the last: a plain line at each quarter, all
    before the first metrics line (they are the only sign of life of a long offline synthesis)."""
    err = run_ok(world, tmp_path / "run", capsys, "--schedule", "offline", "--student-steps", "4")
    lines = [line for line in err.splitlines() if "images made:" in line or "student_step=" in line]
    made = [line.split("images made: ")[1].split(" ")[0] for line in lines if "images made:" in line]
    assert made == ["4/16", "8/16", "12/16", "16/16"]
    assert all("images made:" in line for line in lines[:4]) and "student_step=2 " in lines[4]


def test_live_display_advances_its_images_bar_between_metrics_lines():
    from rich.console import Console

    out = io.StringIO()
    display = LiveDisplay(images=16, student_steps=8, console=Console(file=out, force_terminal=True, width=110))
    with display:
        display.advance(12)
    assert "12/16" in out.getvalue().rsplit("images", 1)[-1] and "0/8" in out.getvalue()


def test_wandb_offline(world, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "unset")
    monkeypatch.delenv("WANDB_MODE")  # the engine's default applies (and monkeypatch removes it afterwards)
    run_dir = tmp_path / "run"
    run_ok(world, run_dir, capsys, "--log-with", "wandb")
    (offline,) = (run_dir / "wandb").glob("offline-run-*")  # offline: nothing was sent anywhere
    assert list(offline.glob("*.wandb"))  # the run's record, for `wandb sync`
    grids = sorted(p.name.split("_")[1] for p in (offline / "files" / "media" / "images").glob("samples_*.png"))
    assert grids == ["4", "8"]  # a sample grid at every evaluation


def test_images_per_s_is_never_0_while_images_are_made(world, tmp_path, capsys):
    # A line every student step: a micro-batch finishes only every other tick, so most lines see no new image.
    run_ok(world, tmp_path / "run", capsys, "--log-every", "1", "--student-steps", "12")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(line["images_per_s"] > 0 for line in lines)


def test_tracker_grids_show_the_newest_images():
    import torch

    from engine.outputs import newest_images
    from engine.replay_buffer import ReplayBuffer

    buffer = ReplayBuffer(5, (1, 2, 2), 3)
    for k in range(7):  # wraps around: holds images 2..6
        buffer.add(torch.full((1, 1, 2, 2), k / 10), torch.zeros(1, 3), torch.eye(3)[[k % 3]], torch.tensor([k]))
    images, targets = newest_images(buffer, 4)
    assert images[:, 0, 0, 0].mul(10).round().tolist() == [6, 5, 4, 3]
    assert targets.argmax(1).tolist() == [0, 2, 1, 0]
    assert len(newest_images(buffer, 50)[0]) == 5


def test_a_resumed_run_logs_each_step_once_to_tensorboard(world, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import engine.loop

    run_dir, calls = tmp_path / "run", []
    real_step = engine.loop.student_step

    def crashing(*args, **kwargs):  # a kill after the checkpoint of tick 4, with steps logged past it
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine.loop, "student_step", crashing)
    assert main(world.argv(run_dir, "--log-with", "tensorboard")) == 130  # stopped at once, no final outputs
    monkeypatch.undo()
    run_ok(world, run_dir, capsys, "--log-with", "tensorboard", "--resume")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("kd_L_kd")] == [2, 4, 6, 8]  # not 2, 4, 6, 4, 6, 8
