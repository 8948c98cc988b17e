"""The fashion world (SPEC §7): disjoint Fashion-MNIST halves, the committed teacher (half A) and prior (half B),
the ``--world`` presets, and the benchmarks' ``--world`` option."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from engine.classifiers import PRIORS, WEIGHTS_DIR
from engine.config import WORLDS, RunConfig, parse_config
from engine.datasets import FASHION_MNIST_DIR, fashion_halves, index_hash, load_dataset
from engine.errors import UserError
from engine.resume import check_same_run
from tests.conftest import run_main

needs_fashion = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
TEACHER = WEIGHTS_DIR / "teacher-fashion.safetensors"
PRIOR = PRIORS["fashion"]


# --- the two halves --------------------------------------------------------------------------------------------------
def test_halves_are_disjoint_cover_the_set_and_split_every_class_evenly():
    labels = np.repeat(np.arange(10), 7)  # 7 per class: odd, so the halves differ by one per class
    a, b = fashion_halves(labels)
    assert not set(a) & set(b) and sorted([*a, *b]) == list(range(len(labels)))
    assert np.array_equal(np.bincount(labels[a]), np.full(10, 3)) and np.array_equal(np.bincount(labels[b]),
                                                                                      np.full(10, 4))
    again = fashion_halves(labels)
    assert np.array_equal(again[0], a) and np.array_equal(again[1], b)  # fixed by the seed, not by chance
    assert not np.array_equal(fashion_halves(labels, seed=1)[0], a)  # and the seed is what fixes it


@needs_fashion
def test_fashion_train_halves_are_disjoint_30k_each():
    train, _ = load_dataset("fashion-mnist", "train")
    a, b = fashion_halves(train.labels.numpy())
    assert len(a) == len(b) == 30_000 and not np.intersect1d(a, b).size
    assert np.array_equal(np.union1d(a, b), np.arange(60_000))
    half_a, info = load_dataset("fashion-mnist", "half-a")
    half_b, _ = load_dataset("fashion-mnist", "half-b")
    assert torch.equal(half_a.images, train.images[a]) and torch.equal(half_b.labels, train.labels[b])
    assert torch.bincount(half_a.labels).tolist() == [3000] * 10 and info.name == "fashion-mnist"


# --- the committed weights -------------------------------------------------------------------------------------------
@needs_fashion
def test_committed_teacher_and_prior_were_trained_on_the_recorded_disjoint_halves():
    train, _ = load_dataset("fashion-mnist", "train")
    a, b = fashion_halves(train.labels.numpy())
    teacher = json.loads(TEACHER.with_suffix(".json").read_text())
    prior = json.loads((PRIOR / "provenance.json").read_text())
    assert teacher["dataset"] == prior["dataset"] == "fashion-mnist"
    assert teacher["train_split"] == "half-a" and prior["train_split"] == "half-b"
    for record in (teacher, prior):  # the split they were trained on is the split the code makes today
        assert record["half_a_sha256"] == index_hash(a) and record["half_b_sha256"] == index_hash(b)
        assert record["train_images"] == 30_000 and record["date"] and record["machine"]
    assert teacher["test_accuracy"] >= 0.92 and teacher["arch"] == "convnet2-w32"
    assert (PRIOR / "unet" / "diffusion_pytorch_model.safetensors").exists() and (PRIOR / "samples.png").exists()
    assert TEACHER.stat().st_size < 4 * 2**20  # a few MB at most


@needs_fashion
def test_evaluate_remeasures_the_committed_fashion_teacher(capsys):
    from engine.evaluate import main

    assert main(["--teacher", "fashion", "--dataset", "fashion-mnist"]) == 0
    result = json.loads(capsys.readouterr().out)
    recorded = json.loads(TEACHER.with_suffix(".json").read_text())["test_accuracy"]
    assert result["n"] == 10_000 and result["accuracy"] == pytest.approx(recorded, abs=1e-4)


def test_the_fashion_preset_loads_the_committed_prior_with_the_fashion_classes():
    from engine.datasets import FASHION_CLASSES, dataset_info
    from engine.world import load_run_prior

    names = json.loads((PRIOR / "provenance.json").read_text())["class_names"]
    assert tuple(names) == FASHION_CLASSES
    cfg = parse_config(["--world", "fashion"]).resolved()
    info = dataset_info(cfg.dataset) if FASHION_MNIST_DIR.is_dir() else None
    prior = load_run_prior(cfg, info or type("Info", (), {"class_names": FASHION_CLASSES})(), torch.device("cpu"))
    assert prior.source == str(PRIOR)  # the fashion prior, not the digits one
    assert prior.image_size == 28 and prior.condition([0, 9]).is_conditional


# --- presets ---------------------------------------------------------------------------------------------------------
def test_digits_preset_is_todays_defaults():
    defaults = RunConfig()
    assert defaults.world == "digits"
    assert all(getattr(defaults, k) == v for k, v in WORLDS["digits"].items())
    assert parse_config([]) == defaults


def test_fashion_preset_resolves_teacher_prior_dataset_student():
    cfg = parse_config(["--world", "fashion"]).resolved()
    assert (cfg.world, cfg.teacher, cfg.prior, cfg.dataset, cfg.student) == (
        "fashion", "fashion", "fashion", "fashion-mnist", "convnet2-w16")
    assert set(WORLDS["fashion"]) == set(WORLDS["digits"])  # every world sets the same fields


def test_alpha_is_per_world_and_an_explicit_bn_wins():
    """α (--bn) differs by world (fashion 0.25, digits 2.0: BENCHMARKS.md "α per world"); the guided step reads it."""
    from engine.synthesis.guided import GuidanceConfig

    assert parse_config(["--world", "fashion"]).resolved().bn == 0.25
    assert parse_config(["--world", "digits"]).resolved().bn == 2.0 == GuidanceConfig().bn
    assert parse_config(["--world", "fashion", "--bn", "1"]).resolved().bn == 1.0
    assert parse_config(["--bn", "2", "--world", "fashion"]).resolved().bn == 2.0
    assert parse_config(["--world", "fashion", "--method", "dmkd"]).resolved().bn == 0  # unguided: α never read


def test_the_latent_step_is_per_world_and_an_explicit_step_size_wins():
    """η (--step-size) differs by world (fashion 0.05, digits 0.1: BENCHMARKS.md "The fashion world's latent step
    changed"); online and offline read the same value."""
    from engine.synthesis.guided import GuidanceConfig

    def eta(*argv):
        return parse_config(list(argv)).resolved().step_size

    assert eta() == eta("--world", "digits") == GuidanceConfig().step_size == 0.1
    assert eta("--world", "fashion") == eta("--world", "fashion", "--schedule", "offline") == 0.05
    assert eta("--world", "fashion", "--step-size", "0.1") == eta("--step-size", "0.1", "--world", "fashion") == 0.1


def test_the_boundary_share_is_per_world_and_read_only_with_the_class_prior():
    """s (--cls-boundary) differs by world (fashion 0.1, digits 0: BENCHMARKS.md "The fashion world's class target
    changed"); online and offline read the same value; without L_cls (β = 0, --no-cls, DM-KD, real-data KD) it has
    no target to move and resolves to 0."""
    from engine.synthesis.guided import GuidanceConfig

    def share(*argv):
        return parse_config(list(argv)).resolved().cls_boundary

    assert share() == share("--world", "digits") == GuidanceConfig().cls_boundary == 0.0
    assert share("--world", "fashion") == share("--world", "fashion", "--schedule", "offline") == 0.1
    explicit = share("--world", "fashion", "--cls-boundary", "0"), share("--cls-boundary", "0", "--world", "fashion")
    assert explicit == (0.0, 0.0)
    for argv in (["--cls", "0"], ["--no-cls"], ["--method", "dmkd"], ["--method", "real-kd"]):
        assert share("--world", "fashion", *argv) == 0.0, argv


def test_sampler_budget_is_per_world_and_explicit_flags_win():
    """Digits samples 25 steps guided every 2nd, fashion 15 guided every step (BENCHMARKS.md, the 25-step sampler
    as the digits default); DM-KD and offline read the same sampler flags."""
    def sampler(*argv):
        cfg = parse_config(list(argv)).resolved()
        return cfg.sampler_steps, cfg.guide_every

    assert sampler() == sampler("--world", "digits") == (25, 2)
    assert sampler("--world", "fashion") == sampler("--world", "fashion", "--method", "dmkd") == (15, 1)
    assert sampler("--method", "dmkd") == sampler("--schedule", "offline") == (25, 2)
    assert sampler("--world", "fashion", "--sampler-steps", "25", "--guide-every", "2") == (25, 2)
    assert sampler("--sampler-steps", "15", "--guide-every", "1") == (15, 1)


def test_each_world_keeps_its_replay_tail_whatever_the_method_and_explicit_flags_win():
    """The replay tail is every world's default, per world (BENCHMARKS.md, "Accuracy of every method at the digits
    defaults, with the replay tail" and "The fashion world's replay tail changed"), whatever the method: half the
    student steps after the last image in digits, three quarters in fashion."""
    def tail(*argv):
        return parse_config(list(argv)).resolved().kd_tail

    assert tail() == tail("--world", "digits") == tail("--method", "deepinv") == 0.5
    assert tail("--world", "fashion") == tail("--world", "fashion", "--method", "dmkd") == 0.75
    assert tail("--world", "fashion", "--method", "deepinv") == 0.75
    assert tail("--world", "fashion", "--kd-tail", "0") == 0.0
    assert tail("--kd-tail", "0.25", "--world", "fashion") == 0.25


def test_real_data_kd_in_the_fashion_world_draws_from_the_teachers_half(monkeypatch):
    """The real-data upper bound is KD on the teacher's own data (half A), never on the prior's half B."""
    import engine.world

    drawn = []
    monkeypatch.setattr(engine.world, "load_dataset", lambda name, split, root=None: (drawn.append((name, split)), 0))
    for world in ("fashion", "digits"):
        engine.world.real_train_set(parse_config(["--world", world, "--method", "real-kd"]).resolved())
    assert drawn == [("fashion-mnist", "half-a"), ("mnist", "train")]


def test_explicit_flags_override_the_preset_wherever_they_stand():
    cfg = parse_config(["--student", "convnet-w8", "--world", "fashion", "--dataset", "mnist"])
    assert (cfg.student, cfg.dataset, cfg.teacher, cfg.prior) == ("convnet-w8", "mnist", "fashion", "fashion")
    cfg = parse_config(["--world", "fashion", "--teacher", "default"])  # even when the value is digits' default
    assert cfg.teacher == "default" and cfg.prior == "fashion"


def test_unknown_world_exits_2_naming_the_choices(capsys):
    from engine.run import main

    code, _, err = run_main(main, ["--world", "cifar", "--dry-run"], capsys)
    assert code == 2 and "invalid choice: 'cifar'" in err and "digits" in err and "fashion" in err


def test_dry_run_prints_what_the_preset_resolved_to(capsys):
    from engine.run import main

    code, out, _ = run_main(main, ["--world", "fashion", "--prior", "my/prior", "--dry-run"], capsys)
    resolved = json.loads(out)
    assert code == 0 and resolved["world"] == "fashion" and resolved["dataset"] == "fashion-mnist"
    assert resolved["teacher"] == "fashion" and resolved["prior"] == "my/prior"


def test_synthesize_takes_the_world_too():
    from engine.synthesize import parse_args

    cfg, _ = parse_args(["--out", "x", "--world", "fashion", "--teacher", "t.safetensors"])
    assert (cfg.world, cfg.prior, cfg.dataset, cfg.teacher) == ("fashion", "fashion", "fashion-mnist", "t.safetensors")


def test_resume_refuses_another_world_and_accepts_an_older_config_without_one():
    saved = json.loads(json.dumps(dataclasses.asdict(parse_config(["--world", "fashion"]).resolved())))
    check_same_run(saved, dict(saved))
    with pytest.raises(UserError, match=r"--world fashion \(now digits\)"):
        check_same_run(saved, dict(saved, world="digits"))
    older = {k: v for k, v in saved.items() if k != "world"}  # a run dir from before --world existed
    check_same_run(older, dict(saved))


def test_resume_holds_a_run_from_before_kd_tail_to_the_tail_it_had():
    """A run saved before --kd-tail existed trained without a tail; today's default keeps half the steps for
    after synthesis, so resuming it with the defaults would change its schedule halfway."""
    digits = json.loads(json.dumps(dataclasses.asdict(parse_config([]).resolved())))
    older = {k: v for k, v in digits.items() if k != "kd_tail"}
    with pytest.raises(UserError, match=r"--kd-tail 0.0 \(now 0.5\)"):
        check_same_run(older, digits)
    check_same_run(older, dict(digits, kd_tail=0.0))
    offline = json.loads(json.dumps(dataclasses.asdict(parse_config(["--schedule", "offline"]).resolved())))
    check_same_run({k: v for k, v in offline.items() if k != "kd_tail"}, offline)  # offline never reads the tail


@needs_fashion
def test_run_fashion_world_end_to_end_records_the_world(tmp_path, capsys):
    from engine.run import main

    run_dir = tmp_path / "run"
    code, _, err = run_main(main, [
        "--world", "fashion", "--run-dir", str(run_dir), "--device", "cpu", "--images", "8", "--gen-batch", "4",
        "--in-flight", "1", "--sampler-steps", "2", "--student-steps", "4", "--batch-size", "8", "--min-buffer", "4",
        "--log-every", "2", "--eval-every", "4", "--checkpoint-every", "4", "--cutmix-every", "1",
        "--repair-steps", "1", "--adv-warmup-images", "4"], capsys)
    assert code == 0, err
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world"] == "fashion" and config["dataset"] == "fashion-mnist"
    assert config["teacher_checkpoint"] == str(TEACHER) and config["prior"] == "fashion"
    assert 0.0 <= json.loads((run_dir / "summary.json").read_text())["student_acc"] <= 1.0


# --- benchmarks ------------------------------------------------------------------------------------------------------
def test_benchmarks_take_the_world_and_write_world_named_results():
    from benchmarks.common import RESULTS_DIR
    from benchmarks.engine_runs import add_world_flag, budget_flags, budget_parser, budget_record, world_paths

    parser = budget_parser("", images=10, student_steps=5, runs=None, out=None)
    add_world_flag(parser)
    args = parser.parse_args(["--world", "fashion", "--extra", "--sampler-steps", "3"])
    world_paths(args, "accuracy")
    assert args.out == RESULTS_DIR / "accuracy_fashion.json" and str(args.runs) == "runs/bench-accuracy-fashion"
    assert budget_flags(args)[:2] == ["--world", "fashion"] and budget_flags(args)[-2:] == ["--sampler-steps", "3"]
    assert budget_record(args)["world"] == "fashion"
    digits = parser.parse_args([])
    world_paths(digits, "teacher_strength")  # the digits world keeps its paths and commands
    assert digits.out == RESULTS_DIR / "teacher_strength.json" and str(digits.runs) == "runs/bench-teacher-strength"
    assert "--world" not in budget_flags(digits)


def test_fashion_benchmarks_train_students_and_teachers_on_half_a(monkeypatch, tmp_path):
    import subprocess

    import benchmarks.accuracy as accuracy
    import benchmarks.teacher_strength as strength

    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        out = command[command.index("--out") + 1]
        (tmp_path / "t.json").write_text(json.dumps({"test_accuracy": 0.5}))
        assert out
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    args = type("Args", (), {"student_steps": 10, "images": 20, "world": "fashion"})()
    accuracy.scratch_student(args, 0, tmp_path / "t", reuse=False)
    strength.train_teacher("convnet2-w32", 0.1, tmp_path / "t", reuse=False, world="fashion")
    for command in calls:
        assert command[command.index("--dataset") + 1] == "fashion-mnist"
        assert command[command.index("--split") + 1] == "half-a"  # the teacher's half, never the prior's


def test_prior_fidelity_counts_teacher_agreement_per_class(tmp_path):
    from benchmarks.prior_fidelity import agreement

    targets = torch.eye(3)[torch.tensor([0, 0, 1, 2])]
    logits = torch.eye(3)[torch.tensor([0, 1, 1, 0])]  # right, wrong, right, wrong
    torch.save({"targets": targets, "teacher_logits": logits, "class_names": ["a", "b", "c"]}, tmp_path / "labels.pt")
    result = agreement(tmp_path)
    assert result["teacher_agreement"] == 0.5 and result["per_class"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert result["chance"] == pytest.approx(1 / 3, abs=1e-4) and result["images"] == 4


def test_fidelity_proxies_use_the_runs_own_teacher(tmp_path, monkeypatch):
    from PIL import Image

    import benchmarks.fidelity as fidelity
    import engine.classifiers
    from engine.datasets import DIGIT_CLASSES, DatasetInfo

    (tmp_path / "synthetic").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "synthetic" / "0.png")
    torch.save({"files": ["0.png"], "teacher_logits": torch.zeros(1, 10)}, tmp_path / "synthetic" / "labels.pt")
    (tmp_path / "config.json").write_text(json.dumps({"teacher_checkpoint": "/w/teacher-fashion.safetensors",
                                                      "dataset": "digits"}))
    asked = []
    real = engine.classifiers.resolve_classifier
    monkeypatch.setattr(engine.classifiers, "resolve_classifier",
                        lambda spec, info, arch=None: asked.append((spec, info.name)) or real("convnet-w8", info))
    monkeypatch.setattr("engine.datasets.dataset_info",
                        lambda name: DatasetInfo(name, DIGIT_CLASSES, (0.5,), (0.5,), 28, 1))
    proxies = fidelity.fidelity_proxies(tmp_path)
    assert asked == [("/w/teacher-fashion.safetensors", "digits")]  # the run's teacher and data, not the default's
    assert proxies["teacher_confidence"] == pytest.approx(0.1)
