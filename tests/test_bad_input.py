"""Issue 17, classes 4-6: bad input that used to end in a traceback, that was accepted without a word, or whose
message pointed at the wrong thing. Each case exits 2 (3 for a diverged run) with one ``error:`` line."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

import engine.train_teacher
from engine.config import MAX_IMAGES, MAX_SEED, RunConfig, build_parser, parse_class_map, parse_config
from engine.errors import UserError, exits_cleanly
from engine.loop import micro_batch
from engine.run import main
from models.priors import SCHEDULERS, PriorLoadError, _hub_error
from tests.conftest import run_main, save_classifier
from tests.test_errors import fails_cleanly

FLOAT_FLAGS = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(RunConfig)
               if typing.get_type_hints(RunConfig)[f.name] is float]


def fixed_size_net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A classifier that only takes 32 px inputs (its head reads a fixed-size flattened map)."""
    return nn.Sequential(nn.Conv2d(in_channels, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 32 * 32, num_classes))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "run"
    yield path
    assert not path.exists(), "a refused run wrote its run dir"


def refused(argv: list[str], capsys, match: str) -> str:
    """A config error: the same one line with and without --dry-run."""
    fails_cleanly([*argv, "--dry-run"], capsys, match)
    with pytest.raises(UserError, match=re.escape(match)):
        parse_config(argv).resolved()
    return match


# --- class 4: raw tracebacks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", FLOAT_FLAGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_must_be_finite(flag, value, capsys):
    refused([f"{flag}={value}"], capsys, f"{flag} must be a finite number (got {value})")


@pytest.mark.parametrize("seed", ["-1", str(MAX_SEED + 1), str(2**64)])
def test_seeds_outside_the_rng_range(seed, capsys):
    refused(["--seed", seed], capsys, f"--seed must lie in [0, {MAX_SEED}]")


def test_the_largest_seed_and_budget_fit_the_rng():
    cfg = RunConfig(seed=MAX_SEED, images=MAX_IMAGES, gen_batch=50)
    _, seeds = micro_batch(cfg, MAX_IMAGES // cfg.gen_batch - 1, 10)
    assert int(seeds[-1]) == MAX_SEED * 10_000_000 + MAX_IMAGES - 1
    torch.Generator().manual_seed(int(seeds[0]) * 1_000_003 + 17)  # what GuidedSampler.start seeds a batch with


def test_absurd_budgets(world, run_dir, capsys):
    refused(["--images", "1000000000000"], capsys, f"--images must be at most {MAX_IMAGES:,}")
    fails_cleanly(world.argv(run_dir, "--buffer-capacity", "1000000000000"), capsys,
                  "the replay buffer of 1,000,000,000,000 images of 1x28x28 would need 812,113.3 GiB")


def test_class_map_in_the_form_the_prior_error_shows(world, tmp_path):
    from engine.world import build_world

    assert parse_class_map("{0: 404, 1: 817}") == {0: 404, 1: 817}  # models/priors.py's message shows this form
    assert parse_class_map('{"0": 404, "ship": "goldfish"}') == {"0": 404, "ship": "goldfish"}
    assert parse_class_map("[3, 1]") == [3, 1]
    reversed_map = "{" + ", ".join(f"{k}: {9 - k}" for k in range(10)) + "}"
    cfg = parse_config(world.argv(tmp_path / "run", "--class-map", reversed_map)).resolved()
    assert build_world(cfg, torch.device("cpu")).prior.condition([0, 3]).cond.tolist() == [9, 6]


@pytest.mark.parametrize("text", ["{0: [1]}", "404", "{0: 404", "not a map"])
def test_class_map_that_is_no_map(text, capsys):
    refused(["--class-map", text], capsys, """pass a JSON object or list, e.g. --class-map '{"0": 404""")


@pytest.mark.parametrize("name, content, match", [
    ("model_index.json", '{"_class_name": ', "cannot read"), ("model_index.json", '["unet"]', "is not a JSON object"),
    ("provenance.json", '{"class_names": ', "cannot read"), ("unet/config.json", "[]", "cannot load the UNet2DModel"),
])
def test_prior_folder_with_a_corrupt_json(world, run_dir, capsys, tmp_path, name, content, match):
    prior = shutil.copytree(world.prior, tmp_path / "prior")
    (prior / name).write_text(content)
    fails_cleanly(world.argv(run_dir, "--prior", str(prior)), capsys, match)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_teacher_checkpoint_that_is_an_empty_dict(world, run_dir, capsys, tmp_path, suffix):
    from safetensors.torch import save_file

    empty = tmp_path / f"empty{suffix}"
    save_file({}, str(empty)) if suffix == ".safetensors" else torch.save({}, empty)
    shutil.copy(world.teacher.with_suffix(".json"), empty.with_suffix(".json"))
    fails_cleanly(world.argv(run_dir, "--teacher", str(empty)), capsys, "holds no state_dict (it is empty)")


def test_dataset_whose_images_the_teacher_cannot_take(world, run_dir, capsys, tmp_path):
    from PIL import Image

    for k in range(10):  # 10 classes, as the teacher, but RGB
        (tmp_path / "rgb" / "test" / str(k)).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "rgb" / "test" / str(k) / "0.png")
    fails_cleanly(world.argv(run_dir, "--dataset", f"imagefolder:{tmp_path / 'rgb'}"), capsys,
                  "has 3x64x64 images but the teacher takes 1x28x28")


def test_models_that_cannot_take_the_teachers_input(world, run_dir, capsys, tmp_path):
    fixed = save_classifier(fixed_size_net(), tmp_path / "fixed", "tests.test_bad_input:fixed_size_net")
    fails_cleanly(world.argv(run_dir, "--teacher", str(fixed)), capsys,
                  "the teacher 'tests.test_bad_input:fixed_size_net' cannot take 1x28x28 inputs (RuntimeError")
    fails_cleanly(world.argv(run_dir, "--student", "tests.test_bad_input:fixed_size_net"), capsys,
                  "the student 'tests.test_bad_input:fixed_size_net' cannot take 1x28x28 inputs (RuntimeError")


def test_torchvision_student_whose_features_msarc_cannot_use(world, run_dir, capsys):
    line = fails_cleanly(world.argv(run_dir, "--student", "tv:mobilenet_v3_small"), capsys,
                         "mSARC cannot pair the student 'tv:mobilenet_v3_small' with the teacher 'convnet-w8'")
    assert line.endswith("pass --no-msarc or choose another student")


# --- class 5: accepted without a word -----------------------------------------------------------------------------

def test_devices(world, run_dir, capsys, monkeypatch):
    refused(["--device", "tpu"], capsys, "--device 'tpu' is not a device; use auto, cpu, cuda or cuda:N")
    refused(["--device", "cuda:x"], capsys, "is not a device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails_cleanly(world.argv(run_dir, "--device", "cuda"), capsys, "--device cuda: CUDA is not available here")
    fails_cleanly(world.argv(run_dir, "--device", "cpu", "--mixed-precision", "fp16"), capsys,
                  "--mixed-precision fp16 needs CUDA and this run is on the CPU")
    fails_cleanly(world.argv(run_dir, "--device", "auto", "--mixed-precision", "fp16"), capsys, "fp16 needs CUDA")


@pytest.mark.parametrize("template", ["a photo", "{0} and {}", "{}{}", "{} {name}", "{"])
def test_prompt_template_without_one_slot(template, capsys):
    refused(["--prompt-template", template], capsys, "must contain {} once, where the class name goes")


def test_guidance_scale_on_an_unconditional_prior_warns_once(world, tmp_path, caplog):
    from diffusers import DDPMScheduler, UNet2DModel

    from engine.world import build_world

    prior = tmp_path / "uncond"
    UNet2DModel(sample_size=14, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                norm_num_groups=4).save_pretrained(prior / "unet")
    DDPMScheduler().save_pretrained(prior / "scheduler")
    for extra, warnings in [(["--guidance-scale", "3"], 1), ([], 0)]:
        caplog.clear()
        cfg = parse_config(world.argv(tmp_path / "run", "--prior", str(prior), *extra)).resolved()
        with caplog.at_level(logging.WARNING):
            build_world(cfg, torch.device("cpu"))
        assert [r.message for r in caplog.records if "guidance-scale" in r.message] == [
            "the prior is unconditional: --guidance-scale 3 has no effect"] * warnings


@pytest.mark.parametrize("flag", ["--lr", "--step-size"])
def test_a_diverged_run_exits_3_with_the_counts(world, tmp_path, capsys, flag):
    run_dir = tmp_path / "run"
    code, out, err = run_main(main, world.argv(run_dir, flag, "1e30"), capsys)
    lines = err.strip().splitlines()
    assert code == 3 and out == "" and "Traceback" not in err, err
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert lines[-1].startswith("error: the run diverged: ") and "lower --lr or --step-size" in lines[-1]
    summary = json.loads((run_dir / "summary.json").read_text())  # written, for inspection
    assert summary["diverged"] is True
    skipped = summary["skipped_student_steps" if flag == "--lr" else "skipped_latent_steps"]
    assert f" {skipped} of " in lines[-1] and skipped > 0


def test_a_healthy_run_is_not_diverged(world, tmp_path, capsys):
    code, out, err = run_main(main, world.argv(tmp_path / "run", "--student-steps", "2", "--images", "8"), capsys)
    assert code == 0, err
    assert json.loads(out)["diverged"] is False


# --- class 6: messages that point at the wrong thing --------------------------------------------------------------

def test_one_scheduler_list_in_help_and_both_errors(world, run_dir, capsys):
    names = ", ".join(SCHEDULERS)
    assert f"diffusers scheduler: {names} or a class name" in " ".join(build_parser().format_help().split())
    fails_cleanly(world.argv(run_dir, "--scheduler", "nope"), capsys, f"use {names} or a diffusers scheduler class")
    fails_cleanly(world.argv(run_dir, "--scheduler", "EulerDiscreteScheduler"), capsys,
                  f"is not variance-preserving (init_noise_sigma 2.64278); use {names}")


def test_train_teacher_takes_the_data_root_it_suggests(tmp_path, capsys):
    code, out, err = run_main(engine.train_teacher.main, ["--dataset", "cifar10", "--split", "train", "--data-root",
                                                          str(tmp_path), "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: cifar10 not found: expected {tmp_path}/cifar-10-batches-py")
    code, _, err = run_main(engine.train_teacher.main, ["--arch", "nope", "--dataset", "digits", "--split", "train",
                                                        "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and err.startswith("error: --arch nope: unknown architecture 'nope'"), err


def test_resume_with_another_process_count_names_both_launchers(tmp_path):
    from engine.outputs import CHECKPOINT_KEYS, RunOutputs

    torch.save({key: {} for key in CHECKPOINT_KEYS} | {"ranks": [{}, {}]}, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError) as err:
        RunOutputs(tmp_path).load_checkpoint(1)
    assert "accelerate launch --num_processes 2 or torchrun --nproc_per_node 2" in str(err.value)


@pytest.mark.parametrize("rank, printed", [("0", "error: bad\n"), ("1", "")])
def test_a_user_error_is_printed_once_not_once_per_process(rank, printed, capsys, monkeypatch):
    monkeypatch.setenv("RANK", rank)

    @exits_cleanly
    def failing(argv=None):
        raise UserError("bad")

    assert failing() == 2
    assert capsys.readouterr().err == printed


def test_hub_error_says_offline_only_when_offline():
    from huggingface_hub.errors import LocalEntryNotFoundError

    missing = LocalEntryNotFoundError("cannot find the requested files in the disk cache")
    offline = str(_hub_error("org/model", missing, local_files_only=True))
    online = str(_hub_error("org/model", missing, local_files_only=False))
    assert "HF_HUB_OFFLINE is set" in offline
    assert "offline" not in online.lower() and "the Hub could not be reached" in online
    assert isinstance(_hub_error("org/model", OSError("404"), local_files_only=False), PriorLoadError)
