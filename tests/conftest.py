"""Shared fixtures: a tiny offline world, built once per session in a few seconds.

    world.teacher      convnet-w8 trained for 30 steps on scikit-learn digits (+ its JSON sidecar), above chance
    world.prior        a random-weight class-conditional pixel DDPM at 14 px with the digits' 10 classes
    world.prior_8px    the same at 8 px: too small for the 28 px teacher (build_world refuses it)
    world.nobn_teacher a teacher without BatchNorm (``tests.conftest:no_bn_classifier``)
    world.argv(run_dir, *extra)   flags for a run of a few seconds (16 images, 4 sampler steps, 8 student steps)

``run_main(main, argv)`` calls a CLI ``main`` in-process and returns ``(exit code, stdout, stderr)``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.checkpoints import atomic_save_safetensors, atomic_write_json
from engine.datasets import DIGIT_CLASSES, MNIST_MEAN, MNIST_STD
from tests.tiny_priors import save_tiny_pixel_prior

# The tensors here are tiny: a second thread only adds contention (10-40x slower on a busy 2-core machine).
torch.set_num_threads(1)

# Flags of a run that finishes in seconds on 2 CPU cores: 4 micro-batches of 4 images, 2 in flight, 4 sampler steps,
# each guided (the digits default guides every 2nd: test_sampler covers it), the student steps spread over generation
# (the digits default keeps half for after it: test_loop's tail test covers it).
TINY_RUN = ["--dataset", "digits", "--student", "convnet-w8", "--device", "cpu", "--seed", "0",
            "--images", "16", "--gen-batch", "4", "--in-flight", "2", "--sampler-steps", "4", "--guide-every", "1",
            "--kd-tail", "0",
            "--student-steps", "8", "--batch-size", "16", "--min-buffer", "4",
            "--log-every", "2", "--eval-every", "4", "--checkpoint-every", "4",
            "--cutmix-every", "2", "--repair-steps", "1", "--repair-band", "1",
            "--deepinv-iters", "4", "--adv-warmup-images", "8"]


def no_bn_classifier(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A teacher architecture without BatchNorm (a ``module:callable`` spec), for the L_bn fallback."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


def save_classifier(model: nn.Module, path: Path, arch: str, class_names=DIGIT_CLASSES) -> Path:
    """``path.safetensors`` + the JSON sidecar that ``engine.classifiers`` reads the architecture from."""
    atomic_save_safetensors(model.state_dict(), path.with_suffix(".safetensors"))
    atomic_write_json({"arch": arch, "class_names": list(class_names), "mean": list(MNIST_MEAN),
                       "std": list(MNIST_STD), "in_channels": 1, "image_size": 28}, path.with_suffix(".json"))
    return path.with_suffix(".safetensors")


def save_digit_prior(path: Path, size: int) -> Path:
    save_tiny_pixel_prior(path, num_classes=10, size=size)
    provenance = {"class_names": list(DIGIT_CLASSES), "dataset": "tiny-random"}  # name-matched to the teacher
    (path / "provenance.json").write_text(json.dumps(provenance))
    return path


@dataclass
class TinyWorld:
    root: Path
    teacher: Path
    teacher_accuracy: float
    nobn_teacher: Path
    prior: Path
    prior_8px: Path

    def argv(self, run_dir: Path | str, *extra: str) -> list[str]:
        return ["--run-dir", str(run_dir), "--teacher", str(self.teacher), "--prior", str(self.prior), *TINY_RUN,
                *extra]


@pytest.fixture(scope="session", autouse=True)
def offline_hub():
    """Nothing in the tests may reach a model hub."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> TinyWorld:
    from engine.datasets import load_dataset
    from engine.evaluate import accuracy
    from engine.train_teacher import train_classifier

    root = tmp_path_factory.mktemp("world")
    model, _ = train_classifier("convnet-w8", "digits", "train", epochs=30 * 64 / 1437, batch_size=64, lr=1e-2)
    test_set, info = load_dataset("digits", "test")
    teacher = save_classifier(model, root / "teacher", "convnet-w8")
    torch.manual_seed(0)
    nobn = save_classifier(no_bn_classifier(), root / "nobn", "tests.conftest:no_bn_classifier")
    return TinyWorld(root, teacher, accuracy(model, test_set, info), nobn,
                     save_digit_prior(root / "prior14", 14), save_digit_prior(root / "prior8", 8))


def run_main(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """A CLI ``main`` in-process: (exit code, stdout, stderr); argparse's SystemExit becomes the code."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    finally:
        logging.getLogger().handlers.clear()  # setup_logging bound a handler to the captured stderr
    out, err = capsys.readouterr()
    return code, out, err
