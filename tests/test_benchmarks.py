"""Benchmarks are long runs, not tests; here only their command lines and pure helpers are checked."""

import importlib

import pytest

NAMES = ["accuracy", "ablations", "frontier", "fidelity", "teacher_strength", "guidance", "throughput", "step_costs",
         "memory", "students", "flops", "host_syncs", "compute", "bn_batch_scaling", "prior_fidelity", "guided_pass",
         "levers", "bn_sweep"]


@pytest.mark.parametrize("name", NAMES)
def test_benchmark_help(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "python -m benchmarks" in capsys.readouterr().out


def test_frontier_counts_unet_forwards_per_image():
    from benchmarks.frontier import unet_forwards_per_image

    assert unet_forwards_per_image(["--sampler-steps", "10"]) == 10 * 4  # forward + backward (2) + recomputed
    assert unet_forwards_per_image(["--sampler-steps", "10", "--grad-mode", "detached", "--reuse-eps"]) == 10
    assert unet_forwards_per_image(["--sampler-steps", "10", "--guide-every", "2"]) == 5 * 4 + 5


def test_seed_rows_aggregate_last_and_best():
    from benchmarks.engine_runs import seed_rows

    row = seed_rows([{"student_acc": 0.5, "best_student_acc": 0.6}, {"student_acc": 0.7, "best_student_acc": 0.7}],
                    [0, 1])
    assert row["last_mean_std"]["mean"] == pytest.approx(0.6) and row["best"] == [0.6, 0.7]


def test_reused_runs_carry_the_commit_that_ran_them_and_rows_list_every_commit(tmp_path):
    import json

    from benchmarks.engine_runs import run_engine, seed_rows

    old, new = tmp_path / "old", tmp_path / "new"
    for run_dir, acc in ((old, 0.5), (new, 0.7)):
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps({"student_acc": acc, "best_student_acc": acc}))
    (new / "record.json").write_text(json.dumps({"commit": "abc123"}))
    # reuse=True must not start an engine run: both have a summary.json
    runs = [run_engine("m", [], old, reuse=True), run_engine("m", [], new, reuse=True)]
    assert runs[1]["record"]["commit"] == "abc123" and runs[1]["student_acc"] == 0.7
    assert seed_rows(runs, [0, 1])["commits"] == ["abc123", "unknown (run before record.json)"]


def test_reuse_refuses_a_run_made_with_another_budget_seed_or_objective(tmp_path):
    import json

    from benchmarks.engine_runs import run_engine
    from engine.config import parse_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = json.loads(parse_config(["--run-dir", str(run_dir), "--seed", "1", "--images", "64"]).resolved().to_json())
    saved.pop("kd_tail")  # a run that predates --kd-tail trained without a tail
    (run_dir / "config.json").write_text(json.dumps(saved | {"log_every": 7, "teacher_arch": "convnet2-w32"}))
    (run_dir / "summary.json").write_text(json.dumps({"student_acc": 0.5}))
    # the same run asked for with defaults spelled out and other reporting: reused, no engine run
    assert run_engine("m", ["--method", "diffdfkd", "--seed", "1", "--images", "64", "--log-every", "3",
                            "--kd-tail", "0"], run_dir, reuse=True)["student_acc"] == 0.5
    for flags, named in ((["--seed", "0", "--images", "64", "--kd-tail", "0"], "--seed 1 (now 0)"),
                         (["--seed", "1", "--images", "2000"], "--images 64 (now 2000)"),
                         (["--seed", "1", "--images", "64", "--student-steps", "9"], "--student-steps"),
                         (["--seed", "1", "--images", "64"], "--kd-tail 0.0 (now 0.5)")):  # the digits default
        with pytest.raises(SystemExit, match=named.replace("(", r"\(").replace(")", r"\)")):
            run_engine("m", flags, run_dir, reuse=True)


def test_reuse_ignores_the_prior_samplers_settings_only_for_methods_that_never_read_them(tmp_path):
    import json

    from benchmarks.engine_runs import run_engine
    from engine.config import parse_config

    for method in ("deepinv", "real-kd", "diffdfkd", "dmkd"):
        run_dir = tmp_path / method
        run_dir.mkdir()
        flags = ["--method", method, "--images", "64"]
        old_sampler = ["--bn", "0.1", "--sampler-steps", "15", "--guide-every", "1"]
        saved = json.loads(parse_config(["--run-dir", str(run_dir), *flags, *old_sampler]).resolved().to_json())
        (run_dir / "config.json").write_text(json.dumps(saved))
        (run_dir / "summary.json").write_text(json.dumps({"student_acc": 0.5}))
        if method in ("deepinv", "real-kd"):  # today's α and sampler differ: still the same run
            assert run_engine("m", flags, run_dir, reuse=True)["student_acc"] == 0.5
            with pytest.raises(SystemExit, match="--images"):  # the budget still counts
                run_engine("m", [*flags, "--images", "65"], run_dir, reuse=True)
        else:  # the prior's samples depend on the sampler (DM-KD's too), and ours on α
            with pytest.raises(SystemExit, match=r"--sampler-steps 15 \(now 25\)"):
                run_engine("m", flags, run_dir, reuse=True)
        if method == "dmkd":  # unguided: the guided step's weights, η, ramp and cadence are never read
            assert run_engine("m", [*flags, *old_sampler, "--step-size", "0.3", "--guidance-ramp", "0.5", "--cls",
                                    "2", "--guide-every", "3"], run_dir, reuse=True)["student_acc"] == 0.5
        if method == "diffdfkd":
            with pytest.raises(SystemExit, match=r"--step-size 0.1 \(now 0.3\)"):
                run_engine("m", [*flags, *old_sampler, "--step-size", "0.3"], run_dir, reuse=True)
    with pytest.raises(SystemExit, match="--deepinv-bn"):  # DeepInversion's own weights still count
        run_engine("m", ["--method", "deepinv", "--images", "64", "--deepinv-bn", "3"], tmp_path / "deepinv",
                   reuse=True)


def test_reuse_ignores_the_replay_tail_only_where_no_image_is_made_during_training(tmp_path):
    import json

    from benchmarks.engine_runs import run_engine
    from engine.config import parse_config

    for name, flags in (("offline", ["--schedule", "offline"]), ("real-kd", ["--method", "real-kd"]),
                        ("online", []), ("deepinv", ["--method", "deepinv"])):
        run_dir = tmp_path / name
        run_dir.mkdir()
        flags = [*flags, "--images", "64"]
        saved = json.loads(parse_config(["--run-dir", str(run_dir), *flags, "--kd-tail", "0"]).resolved().to_json())
        (run_dir / "config.json").write_text(json.dumps(saved))
        (run_dir / "summary.json").write_text(json.dumps({"student_acc": 0.5}))
        if name in ("offline", "real-kd"):  # every image exists before the first student step: the same run
            assert run_engine("m", [*flags, "--kd-tail", "0.5"], run_dir, reuse=True)["student_acc"] == 0.5
        else:  # the tail moves student steps to after synthesis
            with pytest.raises(SystemExit, match=r"--kd-tail 0.0 \(now 0.5\)"):
                run_engine("m", [*flags, "--kd-tail", "0.5"], run_dir, reuse=True)


def test_lever_rows_carry_flags_accuracy_and_the_exposure_of_oldest_and_newest_images(tmp_path):
    import json

    from benchmarks.levers import main

    for name, accs in (("baseline", (0.5, 0.7)), ("kd-tail-0.5", (0.8, 0.9))):
        for seed, acc in zip((0, 1), accs):
            run = tmp_path / "runs" / f"{name}-s{seed}"
            run.mkdir(parents=True)
            exposure = {"mean_draws_by_arrival": [300.0 + seed, 10.0 + seed]}
            (run / "summary.json").write_text(json.dumps({"student_acc": acc, "best_student_acc": acc,
                                                          "replay_exposure": exposure}))
    out = tmp_path / "levers.json"
    assert main(["--seeds", "0", "1", "--runs", str(tmp_path / "runs"), "--reuse", "--out", str(out),
                 "--variants", "baseline", "kd-tail-0.5"]) == 0  # --reuse: no engine run starts
    rows = json.loads(out.read_text())["variants"]
    assert rows["kd-tail-0.5"]["flags"] == ["--kd-tail", "0.5"] and rows["kd-tail-0.5"]["last"] == [0.8, 0.9]
    assert rows["baseline"]["last_mean_std"]["mean"] == pytest.approx(0.6)
    assert rows["baseline"]["draws_oldest_tenth"] == 300.5 and rows["baseline"]["draws_newest_tenth"] == 10.5
    # --base: flags every variant starts from, its own winning (the digits rows measured at 15 steps)
    assert main(["--seeds", "0", "1", "--runs", str(tmp_path / "runs"), "--reuse", "--out", str(out),
                 "--variants", "kd-tail-0.5", "--base", "--sampler-steps 15 --kd-tail 0.25"]) == 0
    results = json.loads(out.read_text())
    assert results["variants"]["kd-tail-0.5"]["flags"] == ["--sampler-steps", "15", "--kd-tail", "0.25", "--kd-tail",
                                                           "0.5"]
    assert results["budget"]["base_flags"] == ["--sampler-steps", "15", "--kd-tail", "0.25"]
    assert "--base '--sampler-steps 15 --kd-tail 0.25'" in results["command"]  # quoted: it can be pasted back


def test_levers_at_equal_compute_give_each_variant_the_images_the_baselines_flops_buy(tmp_path, monkeypatch):
    import json

    import benchmarks.engine_runs
    import benchmarks.levers

    gen = {"baseline": 40.0, "guide-every-4": 30.0}  # counted FLOPs per image; 3 per student step for both
    monkeypatch.setattr(benchmarks.levers, "method_cost", lambda flags: {
        "gen_flops_per_image": gen["guide-every-4" if "--guide-every" in flags else "baseline"],
        "kd_flops_per_step": 3.0})
    started = []
    monkeypatch.setattr(benchmarks.engine_runs, "run_engines", lambda jobs, reuse, n: started.extend(jobs) or [
        {"student_acc": 0.9, "best_student_acc": 0.9} for _ in jobs])
    out = tmp_path / "levers.json"
    assert benchmarks.levers.main(["--seeds", "0", "--images", "100", "--student-steps", "50", "--equal-compute",
                                   "--runs", str(tmp_path), "--out", str(out), "--variants", "baseline",
                                   "guide-every-4"]) == 0
    # 100 images · 40 + 50 steps · 3 = 4150 FLOPs; every 4th step: (4150 − 150) // 30 = 133 images
    flags = {name: run_flags for name, run_flags, _ in started}
    assert flags["guide-every-4"][-2:] == ["--images", "133"] and flags["baseline"][-2:] == ["--images", "100"]
    rows = json.loads(out.read_text())["variants"]
    assert rows["guide-every-4"]["images"] == 133 and rows["baseline"]["images"] == 100
    assert rows["guide-every-4"]["compute"]["total_flops"] == 133 * 30 + 150 <= 4150


def test_every_lever_variant_is_a_valid_engine_command_line():
    from benchmarks.levers import VARIANTS
    from engine.config import parse_config

    for name, flags in VARIANTS.items():  # a typo in a flag would only surface an hour into a lever run
        assert parse_config(["--run-dir", "unused", *flags]).resolved() is not None, name


def test_guided_pass_benchmark_times_both_passes_through_the_pool(tmp_path):
    import json

    from benchmarks.guided_pass import main

    out = tmp_path / "guided_pass.json"
    assert main(["--threads", "1", "--gen-batch", "2", "--in-flight", "2", "--rounds", "1", "--ticks", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["seconds_per_tick"]) == {"pool", "micro-batch"} and result["pool_over_micro_batch"] > 0


def test_bn_sweep_scores_a_run_buffer_first_and_last_images_and_the_predicted_classes(tmp_path):
    """A checkpoint.pt buffer whose first half the teacher reads as its targets and whose second half it does not:
    the two parts must get agreement 1 and 0, and the histogram must count the teacher's classes."""
    import json

    import torch

    from benchmarks.bn_sweep import buffer_metrics, read_buffer
    from engine.sampler import TeacherView
    from models.registry import build_classifier

    torch.manual_seed(0)
    teacher = build_classifier("convnet-w8", num_classes=3, in_channels=1).eval()
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    view = TeacherView(28, 1, [0.5], [0.25])
    with torch.no_grad():
        predicted = teacher(view(images.float() / 255)).argmax(1)
    wrong = (predicted + 1) % 3
    targets = torch.cat([predicted[:4], wrong[4:]])
    one_hot = torch.nn.functional.one_hot(targets, 3).float()
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"ranks": [{"buffer": {"images": images, "targets": one_hot, "logits": torch.zeros(8, 3)}}]},
               run / "checkpoint.pt")
    row = buffer_metrics(teacher, view, read_buffer(run), count=4, batch=4)
    assert row["first"]["teacher_agreement"] == 1.0 and row["last"]["teacher_agreement"] == 0.0
    assert row["agreement_whole_buffer"] == 0.5 and row["images_in_buffer"] == 8
    assert row["predicted_class_histogram"] == torch.bincount(predicted).tolist()
    assert row["first"]["bn_distance"] > 0 and json.dumps(row)


def test_bn_sweep_runs_the_fashion_world_and_the_first_bn_multiplier_reaches_the_guided_step(tmp_path):
    """Two first-BN multipliers at one α, on the fashion world's committed teacher and prior: one row each, named
    by both values, the real test images of that world as the reference, and different images (the multiplier
    reaches the guided step; a sweep that dropped it would give identical rows)."""
    import json

    from benchmarks.bn_sweep import main

    assert main(["--world", "fashion", "--images", "4", "--steps", "2", "--batch", "4", "--bn", "1", "--first-bn",
                 "1", "10", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bn_sweep_fashion.json").read_text())
    rows = result["guided"]
    assert set(rows) == {"bn=1,first=1", "bn=1,first=10"} and result["settings"]["world"] == "fashion"
    assert rows["bn=1,first=10"]["first_bn_multiplier"] == 10 and "real_fashion-mnist" in result
    assert rows["bn=1,first=1"]["bn_distance"] != rows["bn=1,first=10"]["bn_distance"]
    assert (tmp_path / "bn_sweep_fashion.png").exists()


def test_guidance_screens_guide_every_step_whatever_the_worlds_run_does():
    """benchmarks.guidance and bn_sweep measure guidance: each sampler step guided, at the steps they were committed
    at, though the digits run guides every 2nd of 25 (a screen that inherited it would halve its guidance)."""
    from benchmarks import bn_sweep, guidance

    for module in (guidance, bn_sweep):
        args = module.build_parser().parse_args([])
        cfg = guidance.mode_config(args, guidance.MODES["guided"])
        assert cfg.guide_every == 1 and cfg.sampler_steps == args.steps and cfg.bn > 0
    assert bn_sweep.build_parser().parse_args([]).steps == 15
