"""The typed run config: flags generated from the dataclass, presets and validation in ``resolved()``, --dry-run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import RunConfig, build_parser, parse_config
from engine.errors import UserError
from engine.run import main
from tests.conftest import run_main

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_round_trip_through_the_parser():
    assert parse_config([]) == RunConfig()
    parser = build_parser()
    for f in dataclasses.fields(RunConfig):
        assert parser.get_default(f.name) == f.default, f.name


def test_every_field_has_help_and_a_flag():
    flags = build_parser().format_help()
    for f in dataclasses.fields(RunConfig):
        assert f.metadata["help"], f.name
        assert (f.metadata["flag"] or "--" + f.name.replace("_", "-")) in flags


def test_typed_values_are_parsed():
    cfg = parse_config(["--images", "64", "--step-size", "0.5", "--method", "dmkd", "--grad-mode", "detached",
                        "--export", "--aug-flip"])
    assert (cfg.images, cfg.step_size, cfg.method, cfg.grad_mode) == (64, 0.5, "dmkd", "detached")
    assert cfg.export and cfg.aug_flip


@pytest.mark.parametrize("flag, field, weight", [("--no-bn", "use_bn", "bn"), ("--no-cls", "use_cls", "cls"),
                                                 ("--no-adv", "use_adv", "adv"), ("--no-msarc", "use_msarc", "msarc")])
def test_ablation_flags_zero_their_weight(flag, field, weight):
    raw = parse_config([flag])
    assert getattr(raw, field) is False
    cfg = raw.resolved()
    assert getattr(cfg, weight) == 0.0
    others = {"bn", "cls", "adv", "msarc"} - {weight}
    assert all(getattr(cfg, name) == getattr(RunConfig(), name) for name in others)


def test_no_cutmix_and_no_inpaint():
    cfg = parse_config(["--no-cutmix"]).resolved()
    assert cfg.cutmix_every == 0 and cfg.repair_steps == 0  # nothing to repair without CutMix
    cfg = parse_config(["--no-inpaint"]).resolved()
    assert cfg.cutmix_every == RunConfig().cutmix_every and cfg.repair_steps == 0
    assert parse_config(["--no-streams"]).resolved().use_streams is False


def test_method_presets():
    dmkd = parse_config(["--method", "dmkd"]).resolved()
    assert (dmkd.bn, dmkd.cls, dmkd.adv, dmkd.cutmix_every, dmkd.repair_steps) == (0, 0, 0, 0, 0)
    assert dmkd.msarc == RunConfig().msarc  # the student side is unchanged
    deepinv = parse_config(["--method", "deepinv"]).resolved()
    assert deepinv.cutmix_every == 0 and deepinv.bn > 0 and deepinv.cls > 0
    real = parse_config(["--method", "real-kd"]).resolved()
    assert (real.bn, real.cls, real.adv, real.cutmix_every) == (0, 0, 0, 0)
    ours = RunConfig().resolved()
    assert ours.bn > 0 and ours.cls > 0 and ours.adv > 0 and ours.cutmix_every > 0 and ours.repair_steps > 0


def test_resolved_fills_derived_values_and_returns_a_copy():
    raw = parse_config(["--images", "100", "--min-buffer", "500", "--no-bn"])
    cfg = raw.resolved()
    assert cfg.buffer_capacity == 100 and cfg.min_buffer == 100
    assert raw.bn == RunConfig().bn and raw.buffer_capacity == 0  # the parsed config is untouched
    assert cfg.resolved() == cfg  # idempotent


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--images", "abc"], ["--method", "magic"],
                                  ["--step-size", "fast"], ["--im", "10"]])
def test_unknown_or_ill_typed_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--images", "0"], "--images must be positive"),
    (["--student-steps", "-5"], "--student-steps must be positive"),
    (["--sampler-steps", "0"], "--sampler-steps must be positive"),
    (["--bn", "-1"], "--bn must be >= 0"),
    (["--grad-chunk", "-2"], "--grad-chunk must be >= 0"),
    (["--memory-target-gb", "-1"], "--memory-target-gb must be >= 0"),
    (["--tau", "0"], "--tau"),
    (["--kd-tail", "1"], "--kd-tail must lie in"),
    (["--guidance-ramp", "1.5"], "--guidance-ramp must lie in"),
    (["--cls-boundary", "1"], "--cls-boundary must lie in"),
    (["--replay-balance", "-1"], "--replay-balance must be >= 0"),
    (["--resume", "--overwrite"], "contradict"),
])
def test_bad_values_are_user_errors(argv, message, capsys):
    with pytest.raises(UserError, match=message):
        parse_config(argv).resolved()
    code, out, err = run_main(main, [*argv, "--dry-run"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_dry_run_prints_the_resolved_config(capsys):
    code, out, _ = run_main(main, ["--dry-run", "--method", "dmkd", "--images", "64"], capsys)
    assert code == 0
    printed = json.loads(out)
    assert printed == dataclasses.asdict(parse_config(["--dry-run", "--method", "dmkd", "--images", "64"]).resolved())
    assert printed["bn"] == 0 and printed["buffer_capacity"] == 64


def test_dry_run_and_flag_errors_from_the_command_line():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "engine.run", "--dry-run", "--no-adv"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["adv"] == 0.0
    done = subprocess.run([sys.executable, "-m", "engine.run", "--images", "abc"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "invalid int value" in done.stderr and "Traceback" not in done.stderr


def test_guidance_config_carries_the_class_boundary_share():
    from engine.world import guidance_config

    assert guidance_config(RunConfig()).cls_boundary == 0.0
    assert guidance_config(RunConfig(cls_boundary=0.3)).cls_boundary == 0.3
