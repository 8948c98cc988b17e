"""README "Your own teacher and prior": its commands run as written (paths mapped to tiny local stand-ins, budgets
cut by flags appended after them), and its export loader reads a real export back. Also train_teacher's defaults
for RGB data.

Stand-ins: a CIFAR-10 folder in the official python layout (``cifar-10-batches-py``; torchvision's checksum check is
skipped, since these are not the official files), an image folder, and tiny random-weight SD and DiT folders
(``tests.tiny_priors``; the DiT has 1000 classes, so the README's ImageNet class map applies)."""

from __future__ import annotations

import json
import pickle
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.run
import engine.train_teacher
from tests.conftest import run_main
from tests.tiny_priors import save_tiny_dit, save_tiny_sd

README = Path(__file__).parents[1] / "README.md"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PET_CLASSES = ["cat", "dog", "hamster"]

# Appended to every command of the section (argparse keeps the last value of a flag): seconds, not hours.
TINY = {
    "train_teacher": ["--epochs", "1", "--limit", "16", "--batch-size", "8", "--device", "cpu"],
    "run": ["--images", "8", "--gen-batch", "4", "--in-flight", "2", "--sampler-steps", "2", "--student-steps", "4",
            "--batch-size", "8", "--min-buffer", "4", "--log-every", "2", "--eval-every", "4", "--device", "cpu",
            "--prior-resolution", "32", "--no-guidance-grid", "--adv-warmup-images", "4"],
}


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """``python -m engine.X ...`` commands of a bash block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line) for line in joined.splitlines() if line.startswith("python -m engine.")]


def save_fake_cifar10(root: Path, train_per_batch: int = 8, test: int = 20) -> None:
    """``root/cifar-10-batches-py`` in torchvision's (the official) format, random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(name: str, n: int) -> None:
        data = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(data))

    for k in range(1, 6):
        batch(f"data_batch_{k}", train_per_batch)
    batch("test_batch", test)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR_CLASSES}))


def save_image_folder(root: Path, per_class: int = 4) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in PET_CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # any size: resized to 64x64
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    save_fake_cifar10(root / "data")
    save_image_folder(root / "pets")
    return {"~/data": root / "data", "~/models/stable-diffusion-v1-5": save_tiny_sd(root / "sd"),
            "~/models/DiT-XL-2-256": save_tiny_dit(root / "dit", num_classes=1000), "/data/pets": root / "pets",
            "teachers/": root / "teachers", "runs/": root / "runs"}


@pytest.fixture
def unofficial_cifar(monkeypatch):
    """torchvision checks CIFAR's files against the official checksums; the stand-in's cannot match."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)


def mapped(arg: str, stand_ins: dict) -> str:
    for path, local in stand_ins.items():
        if path in arg:
            arg = arg.replace(path, str(local) + ("/" if path.endswith("/") else ""))
    return arg


def test_readme_commands_run(stand_ins, unofficial_cifar, capsys):
    blocks = code_blocks(section("Your own teacher and prior"), "bash")
    cmds = [c for block in blocks for c in commands(block)]
    assert [c[2] for c in cmds] == ["engine.train_teacher", "engine.run", "engine.run", "engine.train_teacher",
                                    "engine.run"]
    for cmd in cmds:
        module, argv = cmd[2].removeprefix("engine."), [mapped(a, stand_ins) for a in cmd[3:]]
        extra = TINY[module] + (["--arch", "resnet8"] if module == "train_teacher" and "--arch" not in argv else [])
        main = engine.train_teacher.main if module == "train_teacher" else engine.run.main
        code, _, err = run_main(main, argv + extra, capsys)
        assert code == 0, f"{' '.join(cmd)}\n{err[-3000:]}"

    runs = stand_ins["runs/"]
    for name, prior in [("cifar10-sd", "sd"), ("cifar10-dit", "dit"), ("pets-sd", "sd")]:
        config = json.loads((runs / name / "config.json").read_text())
        assert config["prior"].endswith(prior) and (runs / name / "student.safetensors").exists()
        assert {"samples.png", "curves.png", "summary.json"} <= {p.name for p in (runs / name).iterdir()}
    teacher = json.loads((stand_ins["teachers/"] / "cifar10-resnet18.json").read_text())
    assert teacher["class_names"] == CIFAR_CLASSES and teacher["image_size"] == 32
    assert (runs / "pets-sd" / "synthetic" / "labels.pt").exists()  # --export, read back below


def test_readme_export_loader_reads_an_export(stand_ins, unofficial_cifar, capsys):
    export = stand_ins["runs/"] / "pets-sd" / "synthetic"
    if not export.exists():  # this test alone: make the export the README's last command makes
        test_readme_commands_run(stand_ins, unofficial_cifar, capsys)
    (block,) = code_blocks(section("Your own teacher and prior"), "python")
    code = block.replace('export = "runs/pets-sd/synthetic"', f"export = {str(export)!r}")
    assert code != block
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # the README's snippet, as a user runs it
    images, labels, logits, x, y = (scope[k] for k in ("images", "labels", "logits", "x", "y"))
    assert len(images) == len(labels["files"]) == 8 and logits.shape == (8, len(PET_CLASSES))
    assert images.classes == sorted(labels["class_names"]) and x.shape == (3, 64, 64) and 0 <= x.min() <= x.max() <= 1
    for (path, folder_class), row_logits in zip(images.samples, logits):  # each file's logits are its own
        i = labels["files"].index(str(Path(path).relative_to(export)))
        assert torch.equal(row_logits, labels["teacher_logits"][i])
        assert images.classes[folder_class] == labels["class_names"][int(labels["targets"][i].argmax())]


def test_train_teacher_defaults_follow_the_data(stand_ins, unofficial_cifar, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the default --out is relative: teachers/DATASET-ARCH
    calls = {}
    real = engine.train_teacher.train_classifier

    def recording(arch, dataset, split, *args, **kwargs):
        calls.update(arch=arch, split=split, shift=kwargs["shift"], flip=kwargs["flip"])
        return real(arch, dataset, split, *args, **kwargs)

    monkeypatch.setattr(engine.train_teacher, "train_classifier", recording)
    code, _, err = run_main(engine.train_teacher.main, ["--dataset", "cifar10", "--data-root",
                                                        str(stand_ins["~/data"]), "--epochs", "1", "--limit", "8",
                                                        "--batch-size", "8"], capsys)
    assert code == 0, err
    # RGB 32 px: the CIFAR-style resnet18, the train split (mnist's default 'trainval' does not exist here), crops
    # padded by 4 and flips; written beside the run, not over the committed MNIST teacher.
    assert calls == {"arch": "resnet18", "split": "train", "shift": 4, "flip": True}
    provenance = json.loads((tmp_path / "teachers" / "cifar10-resnet18.json").read_text())
    assert provenance["augmentation"] == "random shift <= 4 px, horizontal flips"
    code, _, err = run_main(engine.train_teacher.main, ["--dataset", "digits", "--epochs", "0.01", "--split",
                                                        "train"], capsys)
    assert code == 0, err
    assert (calls["arch"], calls["shift"], calls["flip"]) == ("convnet-w64", 2, False)  # digits: no mirror images
    assert (tmp_path / "teachers" / "digits-convnet-w64.safetensors").exists()


def test_train_teacher_refuses_cuda_where_there_is_none(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_main(engine.train_teacher.main, ["--dataset", "digits", "--device", "cuda"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == ("error: --device cuda: CUDA is not available here; use "
                                                          "--device cpu (or auto)")
