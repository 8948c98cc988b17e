"""Numeric guards: a non-finite KD loss skips the student step (weights and optimizer state untouched), a non-finite
latent gradient skips that sample's latent step; both are counted in metrics.jsonl, summary.json and the checkpoint."""

from __future__ import annotations

import copy
import json
import math

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import engine.loop
import engine.synthesis.guided
from engine.config import RunConfig
from engine.loop import student_step
from engine.replay_buffer import ReplayBuffer
from engine.run import main
from engine.sampler import TeacherView
from losses import WeightedSum
from models.registry import build_classifier
from tests.conftest import run_main


def nan_on_calls(real, calls: set[int]):
    """``real`` with its result times NaN on the given (1-based) calls: still in the graph, so gradients are NaN."""
    count = [0]

    def poisoned(*args, **kwargs):
        count[0] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if count[0] in calls else out

    return poisoned


def test_non_finite_kd_loss_leaves_weights_and_adam_state_untouched(monkeypatch):
    torch.manual_seed(0)
    cfg = RunConfig(batch_size=8)
    teacher = build_classifier("convnet-w8", 10, 1).eval().requires_grad_(False)
    student = build_classifier("convnet-w8", 10, 1)
    view = TeacherView(28, 1, (0.5,), (0.5,))
    buffer = ReplayBuffer(16, (1, 28, 28), 10)
    buffer.add(torch.rand(16, 1, 28, 28), torch.randn(16, 10), torch.rand(16, 10), torch.arange(16))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.1)
    kd = WeightedSum({"kl": 1.0, "msarc": cfg.msarc}, name="L_kd")
    generator = torch.Generator().manual_seed(0)
    args = (cfg, student, student, teacher, view, buffer, optimizer, Accelerator(cpu=True), kd, generator)
    monkeypatch.setattr(engine.loop, "kd_kl_loss", nan_on_calls(engine.loop.kd_kl_loss, {2}))

    assert not student_step(*args)[1]  # Adam state exists from here on
    weights, adam = copy.deepcopy(student.state_dict()), copy.deepcopy(optimizer.state_dict())
    assert student_step(*args)[1]  # the NaN step: masked out (a device flag, no host sync in the step)
    for name, value in student.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, adam["state"][index][key]), (index, key)  # moments and step count
    terms, bad = student_step(*args)  # training goes on
    assert not bad and all(torch.isfinite(v) for v in terms.values())
    assert not torch.equal(student.state_dict()["fc.weight"], weights["fc.weight"])


def test_a_non_finite_first_step_leaves_a_fresh_optimizer_fresh(monkeypatch):
    """SGD's momentum and Adam's moments are created by the first step: a masked first step leaves them as zeros,
    which the next step treats exactly as absent (same update as an optimizer that never stepped)."""
    for make in (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
                 lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)):
        finals = []
        for poison in (True, False):
            torch.manual_seed(0)
            cfg = RunConfig(batch_size=8)
            teacher = build_classifier("convnet-w8", 10, 1).eval().requires_grad_(False)
            student = build_classifier("convnet-w8", 10, 1)
            view = TeacherView(28, 1, (0.5,), (0.5,))
            buffer = ReplayBuffer(16, (1, 28, 28), 10)
            buffer.add(torch.rand(16, 1, 28, 28), torch.randn(16, 10), torch.rand(16, 10), torch.arange(16))
            optimizer = make(student.parameters())
            kd = WeightedSum({"kl": 1.0, "msarc": cfg.msarc}, name="L_kd")
            args = (cfg, student, student, teacher, view, buffer, optimizer, Accelerator(cpu=True), kd,
                    torch.Generator().manual_seed(0))
            if poison:
                with monkeypatch.context() as mp:
                    mp.setattr(engine.loop, "kd_kl_loss", nan_on_calls(engine.loop.kd_kl_loss, {1}))
                    assert student_step(*args)[1]
                args = args[:-1] + (torch.Generator().manual_seed(0),)  # the same batch as the clean run's first
            assert not student_step(*args)[1]
            finals.append(copy.deepcopy(student.state_dict()))
        for name in finals[0]:
            assert torch.equal(finals[0][name], finals[1][name]), name


def test_a_run_with_non_finite_steps_completes_and_counts_them(world, tmp_path, capsys, monkeypatch):
    """The 2nd KD loss is NaN; the 1st guided step's class loss is NaN for one sample, whose gradient then is."""
    monkeypatch.setattr(engine.loop, "kd_kl_loss", nan_on_calls(engine.loop.kd_kl_loss, {2}))
    real_cls = engine.synthesis.guided.class_prior_loss
    cls_calls = [0]

    def nan_for_sample_0_once(logits, targets, boundary=0.0):
        cls_calls[0] += 1
        if cls_calls[0] == 1:
            logits = logits + torch.zeros_like(logits).index_fill(0, torch.tensor([0]), float("nan"))
        return real_cls(logits, targets, boundary)

    monkeypatch.setattr(engine.synthesis.guided, "class_prior_loss", nan_for_sample_0_once)
    run_dir = tmp_path / "run"
    code, out, err = run_main(main, world.argv(run_dir), capsys)
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["student_steps"] == 8  # the skipped step still spent its place in the schedule
    assert summary["skipped_student_steps"] == 1 and summary["skipped_latent_steps"] == 1
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["skipped_student_steps"] for line in lines] == [1, 1, 1, 1]  # step 2 is in the first window
    assert lines[-1]["skipped_latent_steps"] == 1
    assert all(math.isfinite(v) for line in lines for v in line.values())  # the last finite terms are logged
    assert all(torch.isfinite(w).all() for w in load_file(str(run_dir / "student.safetensors")).values())
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]
    assert state["skipped_student_steps"] == 1 and state["skipped_latent_steps"] == 1  # restored by --resume
