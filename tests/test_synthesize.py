"""``python -m engine.synthesize`` end to end: tiny pixel and SD priors, a tiny saved teacher, temp folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.checkpoints import atomic_save_safetensors, atomic_write_json
from engine.classifiers import DEFAULT_PRIOR, WEIGHTS_DIR
from engine.datasets import DIGIT_CLASSES, MNIST_MEAN, MNIST_STD
from engine.synthesize import main, parse_args
from models.registry import build_classifier
from tests.conftest import run_main
from tests.tiny_priors import save_tiny_pixel_prior, save_tiny_sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A 10-class 8 px pixel prior, a 16 px SD folder, and a tiny 8 px gray teacher checkpoint with its sidecar."""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    teacher = build_classifier("convnet-w8", 10, 1).eval()
    checkpoint = root / "teacher.safetensors"
    atomic_save_safetensors(teacher.state_dict(), checkpoint)
    atomic_write_json({"arch": "convnet-w8", "class_names": list(DIGIT_CLASSES), "mean": list(MNIST_MEAN),
                       "std": list(MNIST_STD), "in_channels": 1, "image_size": 8}, checkpoint.with_suffix(".json"))
    return {
        "pixel": save_tiny_pixel_prior(root / "pixel", num_classes=10),
        "sd": save_tiny_sd(root / "sd"),
        "teacher": checkpoint,
    }


def args(tiny, prior: str, out: Path, *extra: str) -> list[str]:
    return ["--prior", str(tiny[prior]), "--teacher", str(tiny["teacher"]), "--dataset", "digits",
            "--sampler-steps", "2", "--out", str(out), *extra]


def pngs(out: Path) -> list[Path]:
    return sorted(out.glob("*/*.png"))


def test_pixel_prior_end_to_end(tiny, tmp_path):
    out = tmp_path / "synthetic"
    assert main(args(tiny, "pixel", out, "--images", "12", "--batch", "5", "--seed", "3")) == 0

    labels = torch.load(out / "labels.pt")
    assert labels["class_names"] == list(DIGIT_CLASSES)
    assert labels["targets"].shape == (12, 10) and labels["teacher_logits"].shape == (12, 10)
    targets = labels["targets"].argmax(1)
    assert torch.equal(targets, torch.arange(12) % 10)  # balanced round-robin (no CutMix within 2 steps)
    assert torch.equal(labels["seeds"], 3 * 10_000_000 + torch.arange(12))  # per-image seeds from --seed
    assert torch.isfinite(labels["teacher_logits"]).all()
    assert len(labels["files"]) == 12 and len(set(labels["files"])) == 12

    files = pngs(out)
    assert [p.relative_to(out).as_posix() for p in files] == sorted(labels["files"])
    for rel, k in zip(labels["files"], targets.tolist()):
        assert rel.split("/")[0] == DIGIT_CLASSES[k]
    with Image.open(files[0]) as image:
        assert image.size == (8, 8)  # the teacher's resolution
    assert {p.name for p in out.iterdir() if p.is_file()} == {"labels.pt", "grid.png", "synthesis.json"}
    with Image.open(out / "grid.png") as grid:
        # One row per class; 12 images of 10 classes fill one column (no empty cells); 8 px shown at 7x (56 px).
        assert grid.size == (56 + 2 * 2, 10 * (56 + 2) + 2)
    meta = json.loads((out / "synthesis.json").read_text())
    assert meta["images_per_s"] > 0 and meta["config"]["images"] == 12 and meta["guidance"]["cls"] == 10.0
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]  # no temp folders left behind


def test_same_seed_same_images(tiny, tmp_path):
    """Image i depends on --seed and i only: two runs agree, and another seed gives other images."""
    runs = {}
    for name, seed in [("a", "0"), ("b", "0"), ("c", "1")]:
        out = tmp_path / name
        assert main(args(tiny, "pixel", out, "--images", "4", "--batch", "4", "--seed", seed)) == 0
        runs[name] = torch.load(out / "labels.pt")["teacher_logits"]
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.allclose(runs["a"], runs["c"])


def test_sd_prior_end_to_end_with_cutmix(tiny, tmp_path):
    out = tmp_path / "sd"
    # CutMix after the first of two steps (no repair: it would need steps left after the mix)
    extra = ("--images", "4", "--batch", "4", "--cutmix-every", "1", "--cutmix-prob", "1", "--repair-steps", "0")
    assert main(args(tiny, "sd", out, *extra)) == 0
    labels = torch.load(out / "labels.pt")
    assert labels["targets"].shape == (4, 10)
    assert torch.allclose(labels["targets"].sum(1), torch.ones(4))
    assert (labels["targets"].max(1).values < 1).any()  # CutMix made soft labels
    assert len(pngs(out)) == 4
    with Image.open(pngs(out)[0]) as image:
        assert image.size == (8, 8)  # 3x16x16 RGB decodes -> the teacher's 8x8 input size
    meta = json.loads((out / "synthesis.json").read_text())
    assert meta["prior_kind"] == "sd" and meta["teacher_arch"] == "convnet-w8"


def test_refuses_an_existing_folder_and_overwrite_replaces_it(tiny, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    code, _, err = run_main(main, args(tiny, "pixel", out, "--images", "2"), capsys)
    err = err.strip()
    assert code == 2
    assert err.startswith("error: ") and "--overwrite" in err and len(err.splitlines()) == 1
    assert (out / "keep.txt").read_text() == "earlier work"

    assert main(args(tiny, "pixel", out, "--images", "3", "--batch", "3", "--method", "dmkd", "--overwrite")) == 0
    assert not (out / "keep.txt").exists() and len(pngs(out)) == 3
    meta = json.loads((out / "synthesis.json").read_text())
    assert meta["guidance"]["bn"] == 0.0 and meta["guidance"]["cls"] == 0.0  # dmkd: unguided prior samples
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_user_errors_are_one_line_exit_2(tiny, tmp_path, capsys):
    code, _, err = run_main(main, args(tiny, "pixel", tmp_path / "a", "--prior", str(tmp_path / "nope")), capsys)
    assert code == 2 and "prior folder not found" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(main, args(tiny, "pixel", tmp_path / "b", "--images", "0"), capsys)
    assert code == 2 and "--images must be positive" in err
    file = tmp_path / "file"
    file.write_text("")
    code, _, err = run_main(main, args(tiny, "pixel", file), capsys)
    assert code == 2 and "is a file" in err
    code, _, err = run_main(main, args(tiny, "pixel", tmp_path / "c", "--method", "deepinv"), capsys)
    assert code == 2 and "invalid choice" in err  # argparse: methods without a prior
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_flags_share_run_config_defaults():
    from engine.config import RunConfig

    cfg, out = parse_args(["--out", "x"])
    defaults = RunConfig()
    assert out == Path("x")
    for name in ("images", "bn", "cls", "step_size", "guidance_scale", "sampler_steps", "gen_batch", "cutmix_every",
                 "repair_steps", "repair_band", "grad_mode", "scheduler"):
        assert getattr(cfg, name) == getattr(defaults, name)
    assert cfg.adv == 0.0
    cfg, _ = parse_args(["--out", "x", "--no-cutmix", "--batch", "7"])
    assert cfg.cutmix_every == 0 and cfg.repair_steps == 0 and cfg.gen_batch == 7


@pytest.mark.skipif(not (WEIGHTS_DIR / "teacher-mnist.safetensors").exists() or not DEFAULT_PRIOR.is_dir(),
                    reason="the default world's weights are not trained yet (engine.train_teacher / train_prior)")
def test_default_world(tmp_path):
    out = tmp_path / "default"
    assert main(["--images", "4", "--batch", "4", "--sampler-steps", "2", "--out", str(out)]) == 0
    labels = torch.load(out / "labels.pt")
    assert labels["targets"].shape == (4, 10) and len(pngs(out)) == 4
    with Image.open(pngs(out)[0]) as image:
        assert image.size == (28, 28)
