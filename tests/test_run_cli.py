"""``python -m engine.run`` end to end on the tiny world (in-process ``main``; a run takes about a second)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine.loop
from engine import evaluate
from engine.replay_buffer import ReplayBuffer
from engine.run import main
from tests.conftest import run_main

KD_TERMS = {"kd_kl", "kd_msarc", "kd_L_kd"}


def run_ok(world, run_dir: Path, capsys, *extra: str) -> dict:
    code, out, err = run_main(main, world.argv(run_dir, *extra), capsys)
    assert code == 0, err
    assert "Traceback" not in err
    return json.loads(out.strip().splitlines()[-1])  # the summary line


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(world, tmp_path_factory):
    """One default (diffdfkd, online) run with --export, shared by the output checks."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    try:
        assert main(world.argv(run_dir, "--export")) == 0
    finally:
        logging.getLogger().handlers.clear()  # setup_logging bound a handler to this setup's captured stderr
    return run_dir


def test_run_writes_every_output(finished_run):
    names = {p.name for p in finished_run.iterdir()}
    assert {"config.json", "metrics.jsonl", "student.safetensors", "student.json", "samples.png", "curves.png",
            "guided_vs_unguided.png", "summary.json", "checkpoint.pt", "synthetic"} <= names
    assert not [n for n in names if n.endswith(".tmp")]  # atomic writes left no temp files


def test_config_json_is_the_resolved_config(finished_run, world):
    config = json.loads((finished_run / "config.json").read_text())
    assert config["method"] == "diffdfkd" and config["images"] == 16 and config["student_steps"] == 8
    assert config["buffer_capacity"] == 16  # resolved: 0 -> the image budget
    assert config["teacher_checkpoint"] == str(world.teacher) and config["teacher_arch"] == "convnet-w8"
    assert config["device"] == "cpu" and "--export" in config["argv"]


def test_metrics_lines(finished_run):
    lines = metrics(finished_run)
    assert [line["student_step"] for line in lines] == [2, 4, 6, 8]  # --log-every 2
    for line in lines:
        assert KD_TERMS <= set(line) and {"inv_bn", "inv_cls", "inv_L_inv"} <= set(line)
        assert line["images_per_s"] > 0 and 0 < line["buffer_fill"] <= 1  # a rate over a window: never 0 here
        assert all(isinstance(v, (int, float)) for v in line.values())
    assert lines[-1]["buffer_fill"] == 1.0 and lines[-1]["images"] == 16
    assert any("inv_adv" in line for line in lines)  # on after --adv-warmup-images 8
    evaluated = [line["student_step"] for line in lines if "student_acc" in line]
    assert evaluated == [4, 8]  # --eval-every 4, and the end
    assert all(0 <= line["student_acc"] <= 1 for line in lines if "student_acc" in line)


def test_logged_guidance_terms_are_the_mean_of_each_log_window(world, tmp_path, capsys, monkeypatch):
    """A line's inv_* terms are the sample-weighted mean of every guided step since the line before (the last
    step alone is a few images: a noisy readout of what a weight did); a line with none repeats the last mean."""
    from engine.synthesis.protocol import PoolCounters

    steps, windows = [], []  # (terms, samples) of each guided step; the steps each log line covers
    real_record, real_take = PoolCounters.record_terms, PoolCounters.take_terms

    def record(self, terms, samples):
        steps.append(({name: float(value) for name, value in terms.items()}, samples))
        real_record(self, terms, samples)

    def take(self):
        windows.append(steps[:])
        steps.clear()
        return real_take(self)

    monkeypatch.setattr(PoolCounters, "record_terms", record)
    monkeypatch.setattr(PoolCounters, "take_terms", take)
    run_ok(world, tmp_path / "run", capsys)
    lines = metrics(tmp_path / "run")
    assert len(windows) == len(lines) and max(len(w) for w in windows) > 1  # where the mean and the last differ
    expected = {}
    for line, window in zip(lines, windows):
        for name in {name for terms, _ in window for name in terms}:
            seen = [(terms[name], n) for terms, n in window if name in terms]
            expected[name] = sum(v * n for v, n in seen) / sum(n for _, n in seen)
        assert {k[4:]: v for k, v in line.items() if k.startswith("inv_")} == pytest.approx(expected, rel=1e-5)


def test_summary_and_student_checkpoint(finished_run, capsys):
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["student_steps"] == 8 and summary["images"] == 16
    assert summary["student_acc"] == metrics(finished_run)[-1]["student_acc"]
    assert summary["best_student_acc"] >= summary["student_acc"]
    sidecar = json.loads((finished_run / "student.json").read_text())
    assert sidecar["arch"] == "convnet-w8" and len(sidecar["class_names"]) == 10
    assert sidecar["in_channels"] == 1 and sidecar["image_size"] == 28
    assert sidecar["test_accuracy"] == summary["student_acc"]
    weights = load_file(str(finished_run / "student.safetensors"))
    assert weights["fc.weight"].shape == (10, 32)

    # The checkpoint is a regular classifier checkpoint: engine.evaluate reads it through its sidecar.
    code, out, _ = run_main(evaluate.main, ["--checkpoint", str(finished_run / "student.safetensors"),
                                            "--dataset", "digits"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["accuracy"] == pytest.approx(summary["student_acc"]) and result["arch"] == "convnet-w8"


def grid_cells(path: Path, cell: int, pad: int = 2) -> tuple[int, int, list]:
    """(rows, columns, the cells' pixel arrays) of a torchvision grid of ``cell`` px images."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    rows, columns = ((n - pad) // (cell + pad) for n in pixels.shape)
    assert pixels.shape == (rows * (cell + pad) + pad, columns * (cell + pad) + pad)
    cells = [pixels[pad + r * (cell + pad):][:cell, pad + c * (cell + pad):][:, :cell]
             for r in range(rows) for c in range(columns)]
    return rows, columns, cells


def test_samples_png_is_sized_to_what_the_run_made(finished_run):
    # 16 images of 10 classes: every class has at least one, so one column; 28 px images shown at 2x.
    rows, columns, cells = grid_cells(finished_run / "samples.png", cell=56)
    assert (rows, columns) == (10, 1)
    assert all(cell.any() for cell in cells)  # no empty (black) cell


def test_samples_grid_columns_follow_the_fullest_common_count():
    from engine.outputs import class_grid

    images = torch.rand(23, 1, 28, 28) * 0.5 + 0.5
    labels = torch.tensor([0] * 7 + [1] * 12 + [2] * 4)  # class 3 has none: no row for it
    grid = class_grid(images, labels, num_classes=4, per_class=10)
    assert grid.shape[-2:] == (3 * 58 + 2, 4 * 58 + 2)  # 3 rows, 4 columns (the fewest any present class has)
    assert class_grid(images, labels, 4, per_class=3).shape[-1] == 3 * 58 + 2


def test_guided_vs_unguided_grid(finished_run, world, tmp_path, capsys):
    # One row per class (10): unguided | a white gap column | guided, the same seeds; 14 px prior images are resized
    # to the 28 px teacher and shown at 2x. 16 images of budget: 1 a class and side; 40 or more: 4.
    for run_dir, per_class in [(finished_run, 1), (tmp_path / "run", 4)]:
        if per_class == 4:
            run_ok(world, run_dir, capsys, "--images", "40", "--student-steps", "2")
        rows, columns, cells = grid_cells(run_dir / "guided_vs_unguided.png", cell=56)
        width = 2 * per_class + 1
        assert (rows, columns) == (10, width)
        assert all((cell == 255).all() for cell in cells[per_class::width])
        unguided = [c for i, c in enumerate(cells) if i % width < per_class]
        guided = [c for i, c in enumerate(cells) if i % width > per_class]
        assert any((u != g).any() for u, g in zip(unguided, guided))  # teacher guidance changed the images


def test_no_guidance_grid_flag_and_other_methods(world, tmp_path, capsys):
    run_ok(world, tmp_path / "skip", capsys, "--student-steps", "2", "--no-guidance-grid")
    run_ok(world, tmp_path / "dmkd", capsys, "--student-steps", "2", "--method", "dmkd")
    for name in ("skip", "dmkd"):
        names = {p.name for p in (tmp_path / name).iterdir()}
        assert "guided_vs_unguided.png" not in names and {"samples.png", "curves.png"} <= names


def test_export_image_folder(finished_run):
    folder = finished_run / "synthetic"
    labels = torch.load(folder / "labels.pt")
    assert len(labels["files"]) == 16 and labels["teacher_logits"].shape == (16, 10)
    assert labels["targets"].shape == (16, 10) and torch.allclose(labels["targets"].sum(1), torch.ones(16))
    assert sorted(labels["seeds"].tolist()) == list(range(16))  # seed 0: sample seeds 0..15, each once
    assert labels["class_names"] == [str(k) for k in range(10)]
    for rel in labels["files"]:
        assert (folder / rel).is_file()
    assert {p.name for p in folder.iterdir() if p.is_dir()} == set(labels["class_names"])


DEEPINV_TERMS = {"inv_bn", "inv_cls", "inv_tv_l1", "inv_tv_l2", "inv_l2"}


@pytest.mark.parametrize("method, inv_terms", [("dmkd", set()), ("deepinv", DEEPINV_TERMS), ("real-kd", set())])
def test_each_method_runs(world, tmp_path, capsys, method, inv_terms):
    summary = run_ok(world, tmp_path / method, capsys, "--method", method, "--student-steps", "4",
                     "--eval-every", "2")
    assert summary["student_steps"] == 4
    lines = metrics(tmp_path / method)
    assert KD_TERMS <= set(lines[-1])
    assert {k for line in lines for k in line if k.startswith("inv_") and k != "inv_adv"} == (
        inv_terms | ({"inv_L_inv"} if inv_terms else set()))
    config = json.loads((tmp_path / method / "config.json").read_text())
    assert config["method"] == method
    if method == "dmkd":
        assert (config["bn"], config["cls"], config["adv"], config["cutmix_every"]) == (0, 0, 0, 0)


def test_offline_schedule(world, tmp_path, capsys):
    summary = run_ok(world, tmp_path / "run", capsys, "--schedule", "offline")
    assert summary["student_steps"] == 8 and summary["images"] == 16
    assert all(line["images"] == 16 for line in metrics(tmp_path / "run"))  # training began after synthesis


def test_existing_run_is_refused_then_overwritten(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_ok(world, run_dir, capsys, "--student-steps", "2")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, _, err = run_main(main, world.argv(run_dir, "--student-steps", "2"), capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    summary = run_ok(world, run_dir, capsys, "--student-steps", "4", "--overwrite")
    assert summary["student_steps"] == 4
    assert [line["student_step"] for line in metrics(run_dir)] == [2, 4]  # the old metrics are gone


class Crash(Exception):
    """Stands in for a kill: raised from inside the loop after a checkpoint exists."""


def test_resume_after_a_crash(world, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    argv = world.argv(run_dir, "--checkpoint-every", "2", "--export")
    real_student_step = engine.loop.student_step
    calls = []

    def crashing_student_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise Crash
        return real_student_step(*args, **kwargs)

    monkeypatch.setattr(engine.loop, "student_step", crashing_student_step)
    with pytest.raises(Crash):
        main(argv)
    monkeypatch.undo()
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    saved = checkpoint["ranks"][0]["buffer"]
    assert 0 < checkpoint["state"]["student_step"] < 8 and 0 < len(saved["images"]) < 16
    assert not (run_dir / "summary.json").exists()

    code, _, err = run_main(main, argv, capsys)  # a plain rerun is refused: the run dir holds a run
    assert code == 2 and "--resume" in err

    restored = {}
    real_load = ReplayBuffer.load_state_dict

    def recording_load(self, state):
        real_load(self, state)
        restored.update(self.state_dict())

    monkeypatch.setattr(ReplayBuffer, "load_state_dict", recording_load)
    summary = run_ok(world, run_dir, capsys, "--checkpoint-every", "2", "--export", "--resume")
    for key in ("images", "logits", "targets", "seeds"):
        assert torch.equal(restored[key], saved[key]), key
    assert summary["student_steps"] == 8 and summary["images"] == 16
    assert metrics(run_dir)[-1]["student_step"] == 8
    labels = torch.load(run_dir / "synthetic" / "labels.pt")
    n = len(saved["seeds"])
    assert torch.equal(labels["seeds"][:n], saved["seeds"])  # the restored images are the oldest in the buffer
    assert sorted(labels["seeds"].tolist()) == list(range(16))  # in-flight batches were redone, none twice


def test_help_of_on_off_flags_reads_right(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal width, also inside "--no-..." names
    code, out, _ = run_main(main, ["--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    for flag, what in [("--no-bn", "BN-statistics loss"), ("--no-msarc", "mSARC term of the KD loss"),
                       ("--no-guidance-grid", "--method diffdfkd: guided_vs_unguided.png")]:
        assert f"{flag} {what}" in text and f"(on by default; {flag} turns it off)" in text, flag
    assert "(default: True)" not in text and "(default: False)" not in text  # --no-bn (default: True) misread
    assert "(default: 128)" in text  # other flags keep their default
    import engine.synthesize

    code, out, _ = run_main(engine.synthesize.main, ["--help"], capsys)
    assert code == 0 and "(on by default; --no-bn turns it off)" in out and "(default: True)" not in out
