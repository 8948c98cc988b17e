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
    """What one run did, per tick (a tick ends with the loop's once-per-tick checkpoint decision)."""

    ticks: list[dict] = field(default_factory=list)
    images: int = 0  # images added to the replay buffer so far
    initial_student: torch.Tensor | None = None
    snapshot_ids: set[int] = field(default_factory=set)
    student_ids: set[int] = field(default_factory=set)
    order: list[str] = field(default_factory=list)  # hand-over / generate / train / snapshot, in program order

    def new_tick(self) -> None:
        self.ticks.append({"steps": [], "adds": [], "kd": [], "snapshot": None, "kd_batches": []})

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

    real_copy, real_add, real_sample = engine.loop.copy_weights, ReplayBuffer.add, ReplayBuffer.sample
    real_student_step, real_make_pool = engine.loop.student_step, engine.loop.make_pool
    real_end_of_tick = engine.loop.max_over_processes

    def copy_then_mark(target, source):  # the snapshot for the next tick, after this tick's student steps
        real_copy(target, source)
        rec.current["snapshot"] = fingerprint(source)
        rec.order.append("snapshot")
        rec.snapshot_ids.add(id(target))
        rec.student_ids.add(id(source))

    def make_pool(generator, rng):
        pool = real_make_pool(generator, rng)
        real_tick = pool.tick

        def tick(student=None):
            batches = sorted({int(s) // cfg.gen_batch for s in pool.seeds.tolist()})
            kd_so_far, images_so_far = len(rec.kd_events()), rec.images
            finished = real_tick(student)
            rec.order.append("generate")
            for batch in batches:
                rec.current["steps"].append({"batch": batch, "student": fingerprint(student),
                                             "adv": "adv" in pool.last_terms(), "kd_so_far": kd_so_far,
                                             "images_so_far": images_so_far})
            rec.current["finished_seeds"] = [int(s) for done in finished for s in done.seeds.tolist()]
            rec.snapshot_ids.add(id(student))
            return finished

        monkeypatch.setattr(pool, "tick", tick)
        return pool

    def add(buffer, *args):
        real_add(buffer, *args)
        rec.images += len(args[0])
        rec.current["adds"].append(len(buffer))
        rec.order.append("hand-over")

    def sample(buffer, batch_size, generator=None, **kwargs):
        out = real_sample(buffer, batch_size, generator, **kwargs)
        rec.current["kd_batches"].append(set(buffer.seeds[: len(buffer)].tolist()))  # what the draw could return
        return out

    def student_step(cfg_, student, plain_student, teacher, view, buffer, *rest):
        out = real_student_step(cfg_, student, plain_student, teacher, view, buffer, *rest)
        rec.current["kd"].append({"student": fingerprint(plain_student), "images": buffer.total_added})
        rec.order.append("train")
        return out

    def end_of_tick(accelerator, values):
        rec.new_tick()
        return real_end_of_tick(accelerator, values)

    monkeypatch.setattr(engine.loop, "copy_weights", copy_then_mark)
    monkeypatch.setattr(engine.loop, "make_pool", make_pool)
    monkeypatch.setattr(ReplayBuffer, "add", add)
    monkeypatch.setattr(ReplayBuffer, "sample", sample)
    monkeypatch.setattr(engine.loop, "student_step", student_step)
    monkeypatch.setattr(engine.loop, "max_over_processes", end_of_tick)
    (tmp_path / "run").mkdir()
    summary = co_train(cfg, built, make_accelerator("cpu", "no"), RunOutputs(tmp_path / "run"))
    rec.ticks.pop()  # opened after the last tick
    return rec, summary, cfg


# --- the snapshot hand-off and the overlap order ---------------------------------------------------------------------
def test_adversarial_term_of_tick_n_sees_the_weights_written_in_tick_n_minus_1(world, tmp_path, monkeypatch):
    rec, summary, _ = record_run(world, tmp_path, monkeypatch, "--adv-warmup-images", "0", "--kd-steps-per-tick", "1",
                                 "--student-steps", "6")
    assert summary["student_steps"] == 6
    assert len(rec.snapshot_ids & rec.student_ids) == 0  # the generator reads a copy, never the trained module
    assert len(rec.snapshot_ids) == 1  # ... always the same double buffer
    latest, checked = rec.initial_student, 0
    for n, tick in enumerate(rec.ticks):
        for step in tick["steps"]:
            assert step["adv"], f"tick {n}: L_adv was not computed"
            assert torch.equal(step["student"], latest), f"tick {n}: the snapshot is not tick {n - 1}'s student"
        if tick["kd"]:  # the weights this tick's updates wrote: the snapshot for tick n+1
            assert torch.equal(tick["snapshot"], tick["kd"][-1]["student"])
            if tick["steps"]:
                assert not torch.equal(tick["kd"][-1]["student"], latest)  # ... so tick n's L_adv could not see them
                checked += 1
            latest = tick["snapshot"]
    assert checked >= 3  # several ticks that both generate and train (not a vacuous pass)


def test_kd_batches_of_tick_n_never_hold_images_finished_in_tick_n(world, tmp_path, monkeypatch):
    rec, _, cfg = record_run(world, tmp_path, monkeypatch, "--student-steps", "14")
    checked = 0
    for n, tick in enumerate(rec.ticks):
        finished_now = set(tick.get("finished_seeds", []))
        for drawable in tick["kd_batches"]:
            assert not drawable & finished_now, f"tick {n}: a KD batch could draw images finished in the same tick"
            checked += bool(finished_now)
    assert checked >= 3
    # The order within a tick: last tick's images in, then generation and training side by side, then the snapshot.
    assert rec.order.index("hand-over") < rec.order.index("train")
    for n, tick in enumerate(rec.ticks):
        if tick["kd"] and n + 1 < len(rec.ticks) and rec.ticks[n + 1]["adds"]:
            assert rec.ticks[n + 1]["adds"][0] > (tick["adds"] or [0])[-1]  # images arrive one tick after finishing


def test_stream_pair_is_a_no_op_on_cpu():
    for enabled in (True, False):
        streams = StreamPair(torch.device("cpu"), enabled)
        assert streams.enabled is False
        streams.begin()
        with streams.on("train"):
            streams.wait("train", "generated")
            streams.hand_over(torch.zeros(2), to="train")
        with streams.on("gen"):
            streams.wait("gen", "snapshotted")
            streams.record("generated", "gen")
        with streams.on("train"):
            streams.record("snapshotted", "train")
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
    assert stepped == [[0], [0], [0, 1], [0, 1], [1, 2], [1, 2], [2, 3], [2, 3], [3], [3], []]  # tick 10: hand-over
    fills = {n: tick["adds"] for n, tick in enumerate(rec.ticks) if tick["adds"]}
    assert fills == {4: [4], 6: [8], 8: [12], 10: [16]}  # handed to the buffer the tick after they finish
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
    # Generation spans ticks 0..9 and its images reach the buffer one tick later: it first holds --min-buffer 4
    # images at tick 4, the last arrive at tick 10: 7 ticks x 2 steps.
    assert kd_rate(cfg, 4, batches_left=4, steps_left=14) == 2.0
    assert [len(tick["kd"]) for tick in rec.ticks] == [0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2]
    images_seen = [kd["images"] for kd in rec.kd_events()]
    assert images_seen[0] == 4 and images_seen[-1] == 16  # began with 4 of 16 images, ended as the last arrived
    assert summary["student_steps"] == 14 and summary["ticks"] == 11


def test_offline_schedule_trains_only_after_every_image_exists(world, tmp_path, monkeypatch):
    rec, summary, _ = record_run(world, tmp_path, monkeypatch, "--schedule", "offline")
    assert all(kd["images"] == 16 for kd in rec.kd_events())
    generating = [tick for tick in rec.ticks if tick["steps"]]
    assert all(not tick["kd"] for tick in generating) and rec.ticks[len(generating)]["adds"] == [16]
    assert summary["student_steps"] == 8 and summary["ticks"] == 10 + 8  # then one student step per tick


def test_kd_tail_keeps_a_share_of_the_steps_for_after_synthesis(world, tmp_path, monkeypatch):
    """--kd-tail 0.5 of 14 steps: 7 spread over generation (one per tick, ticks 4..10 as above), then 7 more on the
    finished buffer, one per tick (ticks 11..17), every one of them on all 16 images."""
    rec, summary, _ = record_run(world, tmp_path, monkeypatch, "--student-steps", "14", "--kd-tail", "0.5")
    assert [len(tick["kd"]) for tick in rec.ticks] == [0] * 4 + [1] * 14
    assert [kd["images"] for kd in rec.kd_events()][-8:] == [16] * 8
    assert summary["student_steps"] == 14 and summary["ticks"] == 18 and summary["images"] == 16


def test_summary_reports_replay_exposure_by_arrival(world, tmp_path, monkeypatch):
    """Uniform draws from a growing buffer: the first images are drawn more than the last (what --replay-draws
    balanced evens out); the counts add up to every image drawn."""
    _, summary, cfg = record_run(world, tmp_path, monkeypatch, "--student-steps", "14")
    exposure = summary["replay_exposure"]
    assert exposure["mean"] * 16 == pytest.approx(14 * cfg.batch_size)
    assert exposure["mean_draws_by_arrival"][0] > exposure["mean_draws_by_arrival"][-1]


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
    per_tick = [len(tick["kd"]) for tick in rec.ticks[4:11]]
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
