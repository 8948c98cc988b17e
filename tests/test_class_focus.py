"""--class-focus: per-class KD sums, the class probabilities they set, the labels drawn from them, and the loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.class_focus import class_kd_sums, draw_labels, focus_probs
from engine.config import RunConfig
from engine.loop import micro_batch
from engine.run import main
from tests.conftest import run_main


def test_class_kd_sums_by_hand():
    # Sample 1: teacher uniform, student logits (ln 3, 0); sample 2: student = teacher (KL 0), a CutMix image 1:3.
    tau = 2.0
    student = torch.tensor([[math.log(3.0), 0.0], [0.3, -0.2]])
    teacher = torch.tensor([[0.0, 0.0], [0.3, -0.2]])
    targets = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    p_s = [3 ** 0.5 / (1 + 3 ** 0.5), 1 / (1 + 3 ** 0.5)]  # softmax((ln 3, 0) / 2)
    kl_1 = tau**2 * (0.5 * math.log(0.5 / p_s[0]) + 0.5 * math.log(0.5 / p_s[1]))
    sums, weights = class_kd_sums(student, teacher, targets, tau)
    assert sums.tolist() == pytest.approx([kl_1, 0.0], abs=1e-6)
    assert weights.tolist() == pytest.approx([1.25, 0.75])


def test_focus_probs_by_hand():
    sums, counts = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])  # class 2 not seen
    assert focus_probs(sums, counts, None, 1.0) == pytest.approx([4 / 9, 2 / 9, 1 / 3])
    assert focus_probs(sums, counts, None, 2.0) == pytest.approx([8 / 15, 2 / 15, 1 / 3])
    assert focus_probs(sums, counts, [0.5, 0.3, 0.2], 0.0) == pytest.approx([0.4, 0.4, 0.2])  # F = 0: uniform
    assert focus_probs(sums * 0, counts * 0, [0.5, 0.3, 0.2], 1.0) == [0.5, 0.3, 0.2]  # nothing seen: unchanged
    nan = torch.tensor([float("nan"), 1.0, 1.0])
    assert focus_probs(nan, torch.ones(3), None, 1.0) == pytest.approx([1 / 3, 1 / 3, 1 / 3])


def test_draw_labels_follow_the_probabilities_and_the_seed():
    probs = [0.7, 0.0, 0.3]
    labels = draw_labels(probs, 20_000, seed=5)
    assert torch.equal(labels, draw_labels(probs, 20_000, seed=5))
    assert not torch.equal(labels, draw_labels(probs, 20_000, seed=6))
    shares = torch.bincount(labels, minlength=3) / len(labels)
    assert shares.tolist() == pytest.approx(probs, abs=0.015)


def test_micro_batch_draws_classes_only_when_given_probabilities():
    cfg = RunConfig(images=12, gen_batch=4, seed=1)
    labels, seeds = micro_batch(cfg, 1, 3)
    assert labels.tolist() == [1, 2, 0, 1]  # round-robin by image index
    focused, same_seeds = micro_batch(cfg, 1, 3, [0.0, 0.0, 1.0])
    assert focused.tolist() == [2, 2, 2, 2] and torch.equal(seeds, same_seeds)


def test_class_focus_steers_the_classes_of_an_online_run(world, tmp_path, capsys):
    def run(run_dir, *extra):
        code, out, err = run_main(main, world.argv(run_dir, *extra), capsys)
        assert code == 0, err
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return json.loads(out.strip().splitlines()[-1]), lines

    summary, lines = run(tmp_path / "focus", "--class-focus", "4", "--batch-size", "2", "--log-every", "1")
    probs = [line["class_probs"] for line in lines]
    assert all(sum(p) == pytest.approx(1.0, abs=1e-3) for p in probs)
    assert max(max(p) for p in probs) > 0.2  # the student's loss moved the shares away from uniform (0.1)
    previous = None  # each line's shares follow from its window's per-class loss and the line before's shares
    for line in lines:
        kd = line["class_kd"]
        sums = torch.tensor([0.0 if x is None else x for x in kd], dtype=torch.float64)
        counts = torch.tensor([0.0 if x is None else 1.0 for x in kd], dtype=torch.float64)
        assert line["class_probs"] == pytest.approx(focus_probs(sums, counts, previous, 4.0), abs=1e-5)
        previous = line["class_probs"]
    # a window that leaves out a class seen before: its share carries over (not reset to uniform)
    assert any(None in now["class_kd"] and before["class_probs"] != [0.1] * 10
               for before, now in zip(lines, lines[1:]))
    counts = summary["images_per_class"]
    assert sum(counts) == pytest.approx(16) and counts != [2] * 6 + [1] * 4  # not the round-robin split
    plain, plain_lines = run(tmp_path / "plain")
    assert "images_per_class" not in plain and "class_probs" not in plain_lines[0]
    offline, _ = run(tmp_path / "offline", "--class-focus", "4", "--schedule", "offline", "--no-cutmix")
    assert offline["images_per_class"] == [2] * 6 + [1] * 4  # round-robin: no student trains while offline generates


# --- benchmarks.class_signals: which synthetic-image signal points at the real weak classes -------------------------
def test_spearman_against_hand_computed_values():
    from benchmarks.class_signals import spearman

    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties get their mean rank: ranks (0, 1.5, 1.5, 3) and (0, 2, 1, 3) -> 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 4], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([1, None, 2, 3], [1, 5, 2, 3]) == pytest.approx(1.0)  # a class without images is left out


def test_class_signals_weight_each_image_by_its_soft_targets():
    from benchmarks.class_signals import synthetic_signals

    # the "images" are the logits themselves (identity models): the teacher is sure of class 0 on the first
    # image and of class 1 on the second, a 50/50 CutMix; the student says class 1 on both
    teacher_logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    student_logits = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    signals = synthetic_signals(torch.nn.Identity(), torch.nn.Identity(), (student_logits, teacher_logits), targets,
                                tau=1.0)
    sure, unsure = math.exp(2) / (1 + math.exp(2)), 1 / (1 + math.exp(2))
    kl_first = (sure - unsure) * 2.0  # KL between the two mirrored distributions: (p - q)·ln(p/q), ln(p/q) = 2
    assert signals["kd"] == pytest.approx([kl_first / 1.5, 0.0], abs=1e-5)  # class 0 has weight 1 + 0.5
    assert signals["disagreement"] == pytest.approx([1 / 1.5, 0.0])
    assert signals["teacher_margin"] == pytest.approx([sure - unsure] * 2, abs=1e-5)
    assert signals["teacher_target_prob"] == pytest.approx([(sure + 0.25) / 1.5, 0.5], abs=1e-5)
    assert signals["teacher_label_agreement"] == pytest.approx([1 / 1.5, 0.0])  # image 2's main label: class 0
    teacher_only = synthetic_signals(None, torch.nn.Identity(), (None, teacher_logits), targets, tau=1.0)
    names = ("teacher_margin", "teacher_target_prob", "teacher_label_agreement")
    assert set(teacher_only) == {name + suffix for name in names for suffix in ("", "_unmixed")}
    assert signals["disagreement_unmixed"][0] == pytest.approx(1.0)  # the CutMix image left out ...
    assert signals["disagreement_unmixed"][1] is None  # ... and with it class 1's only image
    assert teacher_only["teacher_margin"] == signals["teacher_margin"]
