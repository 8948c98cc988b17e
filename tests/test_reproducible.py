"""Reproducibility on CPU: the same command and seed give a bit-identical student, and a run stopped after a
checkpoint and resumed ends bit-identical to the run that was never stopped."""

from __future__ import annotations

import hashlib

import pytest
import torch

import engine.outputs
from engine.run import main
from tests.conftest import run_main


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(world, run_dir, capsys, *extra: str) -> str:
    code, _, err = run_main(main, world.argv(run_dir, *extra), capsys)
    assert code == 0, err
    return digest(run_dir / "student.safetensors")


@pytest.mark.parametrize("method", ["diffdfkd", "deepinv"])
def test_same_seed_twice_gives_the_same_student(world, tmp_path, capsys, method):
    first = run(world, tmp_path / "a", capsys, "--method", method)
    torch.manual_seed(12345)  # whatever the process did before must not matter
    torch.randn(7)
    assert run(world, tmp_path / "b", capsys, "--method", method) == first
    assert run(world, tmp_path / "c", capsys, "--method", method, "--seed", "1") != first


class Crash(Exception):
    pass


# --class-focus: 24 images, so that the third checkpoint (tick 9) holds a half-summed class window whose shares
# decide the labels of micro-batches not yet started.
@pytest.mark.parametrize("method, crash_at", [(("diffdfkd",), 2), (("deepinv",), 2),
                                              (("diffdfkd", "--class-focus", "4", "--images", "24"), 3)],
                         ids=["diffdfkd", "deepinv", "class-focus"])
def test_a_run_resumed_from_a_mid_run_checkpoint_ends_bit_identical(world, tmp_path, capsys, monkeypatch, method,
                                                                   crash_at):
    # Checkpoints every 3 ticks with micro-batches in flight (2 in flight, staggered) and L_adv on from 8 images.
    flags = ("--method", *method, "--checkpoint-every", "3", "--checkpoint-minutes", "0")
    uninterrupted = run(world, tmp_path / "whole", capsys, *flags)

    real_save = engine.outputs.RunOutputs.save_checkpoint
    saves = []

    def save_then_crash(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        saves.append(args[-1])  # the in-flight micro-batches it saved
        if len(saves) == crash_at:
            raise Crash

    monkeypatch.setattr(engine.outputs.RunOutputs, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run_main(main, world.argv(tmp_path / "cut", *flags), capsys)
    assert saves[-1], "the checkpoint was taken with no micro-batch in flight: the test would prove nothing"
    monkeypatch.setattr(engine.outputs.RunOutputs, "save_checkpoint", real_save)
    assert run(world, tmp_path / "cut", capsys, *flags, "--resume") == uninterrupted
