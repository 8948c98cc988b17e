"""The co-training loop (SPEC §4): the snapshot hand-off, staggered micro-batches, online/offline schedules, the
student-step rate and the adversarial warm-up, observed by recording what the loop does tick by tick."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import engine.loop
from engine.config import RunConfig, parse_config
from engine.loop import co_train, kd_rate, micro_batch
from engine.outputs import RunOutputs
from engine.replay_buffer import ReplayBuffer
from engine.run import make_accelerator
from engine.streams import StreamPair, copy_weights
from engine.world import build_world
from models.registry import build_classifier


def fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter and buffer (BN running statistics included), flattened into one vector."""
    return torch.cat([t.detach().flatten().double().clone() for t in module.state_dict().values()])


@dataclass
class Recording:
    """What one run did, per tick (a tick's generation phase starts with the snapshot refresh)."""

    ticks: list[dict] = field(default_factory=list)
    images: int = 0  # images added to the replay buffer so far
    initial_student: torch.Tensor | None = None
    snapshot_ids: set[int] = field(default_factory=set)
    student_ids: set[int] = field(default_factory=set)

    def new_tick(self) -> None:
        self.ticks.append({"steps": [], "adds": [], "kd": []})

    @property
    def current(self) -> dict:
        if not self.ticks:
            self.new_tick()
        return self.ticks[-1]

    def kd_events(self) -> list[dict]:
        return [kd for tick in self.ticks for kd in tick["kd"]]


def record_run(world, tmp_path: Path, monkeypatch, *flags: str) -> tuple[Recording, dict, RunConfig]:
    """Build the tiny world, wrap the loop's collaborators with recorders, and run ``co_train``."""
    cfg = parse_config(world.argv(tmp_path / "run", *flags)).resolved()
    built = build_world(cfg, torch.device("cpu"))
    rec = Recording(initial_student=fingerprint(built.student))

    real_copy, real_step, real_add = engine.loop.copy_weights, built.generator.step, ReplayBuffer.add
    real_student_step = engine.loop.student_step

    def copy_then_mark(target, source):  # called once per generating tick, before any latent step
        real_copy(target, source)
        rec.new_tick()
        rec.snapshot_ids.add(id(target))
        rec.student_ids.add(id(source))

    def step(batch, student=None):
        real_step(batch, student)
        rec.current["steps"].append({"batch": int(batch.seeds[0]) // cfg.gen_batch, "student": fingerprint(student),
                                     "adv": "adv" in batch.last_terms, "kd_so_far": len(rec.kd_events()),
                                     "images_so_far": rec.images})
        rec.snapshot_ids.add(id(student))

    def add(buffer, *args):
        real_add(buffer, *args)
        rec.images += len(args[0])
        rec.current["adds"].append(len(buffer))

    def student_step(cfg_, student, plain_student, teacher, view, buffer, *rest):
        terms = real_student_step(cfg_, student, plain_student, teacher, view, buffer, *rest)
        rec.current["kd"].append({"student": fingerprint(plain_student), "images": buffer.total_added})
        return terms

    monkeypatch.setattr(engine.loop, "copy_weights", copy_then_mark)
    monkeypatch.setattr(built.generator, "step", step)
    monkeypatch.setattr(ReplayBuffer, "add", add)
    monkeypatch.setattr(engine.loop, "student_step", student_step)
    (tmp_path / "run").mkdir()
    summary = co_train(cfg, built, make_accelerator("cpu", "no"), RunOutputs(tmp_path / "run"))
    return rec, summary, cfg


# --- the snapshot hand-off ------------------------------------------------------------------------------------------
def test_adversarial_term_at_tick_n_plus_1_sees_the_updates_of_tick_n(world, tmp_path, monkeypatch):
    rec, summary, _ = record_run(world, tmp_path, monkeypatch, "--adv-warmup-images", "0", "--kd-steps-per-tick", "1",
                                 "--student-steps", "6")
    assert summary["student_steps"] == 6
    assert len(rec.snapshot_ids & rec.student_ids) == 0  # the generator reads a copy, never the trained module
    assert len(rec.snapshot_ids) == 1  # ... always the same double buffer
    latest, before_latest, checked = rec.initial_student, None, 0
    for n, tick in enumerate(rec.ticks):
        for step in tick["steps"]:
            assert step["adv"], f"tick {n}: L_adv was not computed"
            assert torch.equal(step["student"], latest), f"tick {n}: the snapshot is not the latest student"
            if before_latest is not None:
                assert not torch.equal(step["student"], before_latest), f"tick {n}: the snapshot is one step stale"
                checked += 1
        for kd in tick["kd"]:  # the updates of this tick: what the next tick's snapshot must hold
            before_latest, latest = latest, kd["student"]
    assert checked >= 8  # several ticks with student updates before them (not a vacuous pass)


def test_stream_pair_is_a_no_op_on_cpu():
    for enabled in (True, False):
        streams = StreamPair(torch.device("cpu"), enabled)
        assert streams.enabled is False
        with streams.on("gen"):
            streams.wait("gen", "trained")
            streams.record("snapshotted", "gen")
        with streams.on("train"):
            streams.wait("train", "snapshotted")
            streams.record("trained", "train")
        streams.join()


def test_copy_weights_copies_parameters_and_batchnorm_buffers():
    torch.manual_seed(0)
    source, target = build_classifier("convnet-w8", 10, 1), build_classifier("convnet-w8", 10, 1)
    source.train()(torch.randn(4, 1, 28, 28))  # moves the BN running statistics away from their init
    assert not torch.equal(fingerprint(source), fingerprint(target))
    copy_weights(target, source)
    for (name, t), s in zip(target.state_dict().items(), source.state_dict().values()):
        assert torch.equal(t, s), name
        assert t.data_ptr() != s.data_ptr(), name  # a copy, not shared storage
    with torch.no_grad():
        next(source.parameters()).add_(1.0)
    assert not torch.equal(fingerprint(source), fingerprint(target))


# --- pipelined generation -------------------------------------------------------------------------------------------
def test_micro_batches_are_staggered_and_the_buffer_fills_continuously(world, tmp_path, monkeypatch):
    # 4 micro-batches of 4 images, 4 sampler steps, 2 in flight: a new batch every 2 ticks, one finishes every 2 ticks.
    rec, summary, _ = record_run(world, tmp_path, monkeypatch, "--student-steps", "14")
    stepped = [[s["batch"] for s in tick["steps"]] for tick in rec.ticks]
    assert stepped == [[0], [0], [0, 1], [0, 1], [1, 2], [1, 2], [2, 3], [2, 3], [3], [3]]
    fills = {n: tick["adds"] for n, tick in enumerate(rec.ticks) if tick["adds"]}
    assert fills == {3: [4], 5: [8], 7: [12], 9: [16]}
    assert summary["images"] == 16


def test_micro_batch_labels_and_seeds():
    cfg = RunConfig(images=10, gen_batch=4, seed=2)
    labels, seeds = micro_batch(cfg, 2, num_classes=3)  # the last, partial batch
    assert labels.tolist() == [8 % 3, 9 % 3] and seeds.tolist() == [20_000_008, 20_000_009]
    all_labels = torch.cat([micro_batch(cfg, i, 3)[0] for i in range(3)])
    assert torch.bincount(all_labels).tolist() == [4, 3, 3]  # balanced round-robin


# --- schedules and the student-step rate ----------------------------------------------------------------------------
def test_online_training_starts_while_generating_and_spreads_over_it(world, tmp_path, monkeypatch):
    rec, summary, cfg = record_run(world, tmp_path, monkeypatch, "--student-steps", "14")
    # Generation spans ticks 0..9; the buffer first holds --min-buffer 4 images at tick 3: 7 ticks x 2 steps.
    assert kd_rate(cfg, 4, batches_left=4, steps_left=14) == 2.0
    assert [len(tick["kd"]) for tick in rec.ticks] == [0, 0, 0, 2, 2, 2, 2, 2, 2, 2]
    images_seen = [kd["images"] for kd in rec.kd_events()]
    assert images_seen[0] == 4 and images_seen[-1] == 16  # began with 4 of 16 images, ended as the last arrived
    assert summary["student_steps"] == 14 and summary["ticks"] == 10


def test_offline_schedule_trains_only_after_every_image_exists(world, tmp_path, monkeypatch):
    rec, summary, _ = record_run(world, tmp_path, monkeypatch, "--schedule", "offline")
    assert all(kd["images"] == 16 for kd in rec.kd_events())
    generating = [tick for tick in rec.ticks if tick["steps"]]
    assert all(not tick["kd"] for tick in generating[:-1]) and generating[-1]["adds"] == [16]
    assert summary["student_steps"] == 8 and summary["ticks"] == 10 + 8  # then one student step per tick


def test_kd_rate():
    cfg = RunConfig(images=16, gen_batch=4, in_flight=2, min_buffer=4, student_steps=14)
    assert kd_rate(cfg, 4, 4, 14) == 2.0  # ticks 3..9 of generation
    assert kd_rate(cfg, 4, 4, 7) == 1.0
    # Resumed with 2 batches left and a full-enough buffer: train from the first tick over the 6 generation ticks.
    assert kd_rate(cfg, 4, 2, 6, buffered=8) == 1.0
    cfg8 = RunConfig(images=16, gen_batch=4, in_flight=2, min_buffer=8, student_steps=12)  # waits for 2 batches
    assert kd_rate(cfg8, 4, 4, 12) == 12 / (10 - 5)
    assert kd_rate(cfg, 4, 0, 5) == 1.0  # nothing left to generate
    assert kd_rate(RunConfig(kd_steps_per_tick=3), 20, 10, 100) == 3.0


@pytest.mark.parametrize("student_steps", [5, 9, 20])
def test_fractional_rates_finish_with_generation(world, tmp_path, monkeypatch, student_steps):
    rec, summary, cfg = record_run(world, tmp_path, monkeypatch, "--student-steps", str(student_steps))
    rate = kd_rate(cfg, 4, 4, student_steps)
    per_tick = [len(tick["kd"]) for tick in rec.ticks[3:10]]
    assert all(math.floor(rate) <= k <= math.ceil(rate) for k in per_tick)
    assert sum(per_tick) >= student_steps - 1  # at most one step (float rounding) after the last image
    assert summary["student_steps"] == student_steps and summary["images"] == 16


# --- the adversarial warm-up ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["online", "offline"])
def test_adversarial_term_turns_on_after_the_warmup_in_images(world, tmp_path, monkeypatch, schedule):
    """The warm-up counts images made, so the offline schedule (no student step during synthesis) gets L_adv too,
    against the student as it is then (untrained)."""
    rec, _, _ = record_run(world, tmp_path, monkeypatch, "--adv-warmup-images", "8", "--student-steps", "8",
                           "--schedule", schedule)
    steps = [step for tick in rec.ticks for step in tick["steps"]]
    assert [step["adv"] for step in steps] == [step["images_so_far"] >= 8 for step in steps]
    assert any(step["adv"] for step in steps) and not all(step["adv"] for step in steps)
    if schedule == "offline":
        assert all(step["kd_so_far"] == 0 for step in steps)  # every latent step ran before any student step
        assert all(torch.equal(step["student"], rec.initial_student) for step in steps)


def test_no_adv_never_turns_it_on(world, tmp_path, monkeypatch):
    rec, _, _ = record_run(world, tmp_path, monkeypatch, "--adv-warmup-images", "0", "--no-adv")
    assert not any(step["adv"] for tick in rec.ticks for step in tick["steps"])


# --- the KD step -----------------------------------------------------------------------------------------------------
def test_cached_logits_with_msarc_take_the_cam_class_from_the_augmented_view(world, tmp_path, monkeypatch):
    """KL reads the cached logits; the CAMs of mSARC are built from the teacher's features on the augmented view,
    so their top class must come from the teacher's logits on that same view, not from the cached ones."""
    cfg = parse_config(world.argv(tmp_path / "run", "--teacher-logits", "cached")).resolved()
    built = build_world(cfg, torch.device("cpu"))
    teacher, student = built.teacher.model, built.student
    buffer = ReplayBuffer(32, (1, 28, 28), 10)
    images = torch.rand(32, 1, 28, 28)
    cached = torch.full((32, 10), -5.0)
    cached[:, 3] = 5.0  # every cached label says "3"
    buffer.add(images, cached, torch.nn.functional.one_hot(torch.arange(32) % 10, 10).float(), torch.arange(32))
    seen = {}
    real_forward = teacher.forward

    def forward(x, return_features=False):
        out = real_forward(x, return_features=return_features)
        if return_features:
            seen["view_logits"] = out[0]
        return out

    def record_msarc(s_feats, t_feats, s_w, t_w, logits):
        seen["msarc_logits"] = logits
        return torch.zeros(()) + 0 * sum(f.sum() for f in s_feats)

    real_kl = engine.loop.kd_kl_loss

    def record_kl(student_logits, teacher_logits, tau):
        seen["kl_logits"] = teacher_logits
        return real_kl(student_logits, teacher_logits, tau)

    monkeypatch.setattr(teacher, "forward", forward)
    monkeypatch.setattr(engine.loop, "msarc_loss", record_msarc)
    monkeypatch.setattr(engine.loop, "kd_kl_loss", record_kl)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    kd = engine.loop.WeightedSum({"kl": 1.0, "msarc": 1.0})
    terms, bad = engine.loop.student_step(cfg, student, student, teacher, built.view, buffer, optimizer,
                                          make_accelerator("cpu", "no"), kd, torch.Generator().manual_seed(0))
    assert not bad
    assert (seen["kl_logits"].argmax(1) == 3).all()  # KL: the cached soft labels
    assert seen["msarc_logits"] is seen["view_logits"]  # CAM class: the view the features came from
    assert (seen["view_logits"].argmax(1) != 3).any()  # the two disagree here, so the test can tell them apart
