"""The offline datasets (SPEC §7) and the ``engine.evaluate`` CLI."""

from __future__ import annotations

import json

import pytest
import torch

from engine import evaluate
from engine.datasets import FASHION_MNIST_DIR, TensorImageDataset, as_tensors, load_dataset
from engine.errors import UserError
from tests.conftest import run_main


def check_images(dataset: TensorImageDataset, n: int, num_classes: int = 10) -> None:
    assert len(dataset) == n and dataset.images.shape == (n, 1, 28, 28) and dataset.images.dtype == torch.uint8
    assert dataset.labels.dtype == torch.int64
    assert dataset.labels.min() == 0 and dataset.labels.max() == num_classes - 1
    image, label = dataset[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and isinstance(label, int)
    assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.5  # [0, 1], not 0..255 or all black


def test_mnist_splits():
    trainval, info = load_dataset("mnist", "trainval")
    check_images(trainval, 60_000)
    test, _ = load_dataset("mnist", "test")
    check_images(test, 10_000)
    assert info.name == "mnist" and info.class_names == tuple("0123456789") and info.mean == (0.1307,)
    assert torch.bincount(test.labels).min() > 800  # every digit is present in numbers
    with pytest.raises(UserError, match="no split 'validation'"):
        load_dataset("mnist", "validation")


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist():
    train, info = load_dataset("fashion-mnist", "train")
    check_images(train, 60_000)
    test, _ = load_dataset("fashion-mnist", "test")
    check_images(test, 10_000)
    assert info.class_names[0] == "t-shirt" and info.num_classes == 10


def test_fashion_mnist_missing_names_the_package(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test", root=tmp_path)


def test_digits_are_mnist_shaped_with_an_empty_border():
    everything, info = load_dataset("digits", "all")
    check_images(everything, 1797)
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert everything.images[:, 0, border].max() == 0  # the 4-px frame is empty
    assert everything.images[:, 0, 4:24, 4:24].float().mean() > 10  # the 20x20 digit is not
    train, _ = load_dataset("digits", "train")
    test, _ = load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and abs(len(test) - 0.2 * 1797) <= 10  # a fixed stratified 80/20 split
    assert torch.equal(load_dataset("digits", "test")[0].labels, test.labels)  # the same split every time


def test_animal_mnist_split_sizes():
    train, info = load_dataset("animal-mnist", "train")
    test, _ = load_dataset("animal-mnist", "test")
    check_images(train, 8000)
    check_images(test, 2000)
    assert info.class_names[0] == "bear" and info.num_classes == 10
    assert torch.bincount(test.labels).tolist() == [200] * 10  # stratified


def test_missing_cifar_names_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"cifar10 not found: expected .*cifar-10-batches-py.*--data-root"):
        load_dataset("cifar10", "test", root=tmp_path)
    with pytest.raises(UserError, match="cifar-100-python"):
        load_dataset("cifar100", "train", root=tmp_path)


def test_image_folder(tmp_path):
    from PIL import Image

    for split, n in (("train", 2), ("test", 1)):
        for k, name in enumerate(("cat", "dog")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10, 12), (200 * k, 50, 100)).save(tmp_path / split / name / f"{i}.png")
    test, info = load_dataset(f"imagefolder:{tmp_path}", "test")
    assert info.class_names == ("cat", "dog") and info.channels == 3 and info.image_size == 64
    images, labels = as_tensors(test)
    assert images.shape == (2, 3, 64, 64) and labels.tolist() == [0, 1]
    assert 0 <= images.min() and images.max() <= 1
    assert images[1, 0].mean() > images[0, 0].mean()  # the red channel of the "dog" image is brighter
    with pytest.raises(UserError, match="image folder split not found"):
        load_dataset(f"imagefolder:{tmp_path}", "val")


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown dataset 'mnsit'; use one of: mnist, fashion-mnist"):
        load_dataset("mnsit")


def test_evaluate_cli_prints_one_json_line(world, capsys):
    code, out, err = run_main(evaluate.main, ["--checkpoint", str(world.teacher), "--dataset", "digits"], capsys)
    assert code == 0, err
    assert out.count("\n") == 1
    result = json.loads(out)
    assert 0 <= result["accuracy"] <= 1 and result["accuracy"] == pytest.approx(world.teacher_accuracy)
    assert result["accuracy"] > 0.2  # the 30-step teacher is above chance (0.1)
    assert result["n"] == len(load_dataset("digits", "test")[0]) and result["arch"] == "convnet-w8"


def test_evaluate_per_class_and_agreement(world, capsys):
    argv = ["--checkpoint", str(world.teacher), "--dataset", "digits", "--per-class"]
    code, out, err = run_main(evaluate.main, [*argv, "--agreement", str(world.teacher)], capsys)
    assert code == 0, err
    result = json.loads(out)
    test_set, info = load_dataset("digits", "test")
    counts = torch.bincount(test_set.labels, minlength=10).float()
    per_class = torch.tensor(result["per_class_accuracy"])
    assert (per_class * counts).sum() / counts.sum() == pytest.approx(result["accuracy"], abs=1e-3)
    assert per_class.min() < per_class.max()  # the 30-step teacher is not equally good on every class
    assert result["agreement"] == 1.0 and result["per_class_agreement"] == [1.0] * 10  # itself
    code, out, err = run_main(evaluate.main, [*argv, "--agreement", str(world.nobn_teacher)], capsys)  # another net
    other = json.loads(out)
    assert code == 0 and other["agreement"] < 1.0 and min(other["per_class_agreement"]) < 1.0
    code, _, err = run_main(evaluate.main, [*argv, "--agreement", "convnet-w8"], capsys)
    assert code == 2 and "untrained architecture" in err


def test_evaluate_cli_errors(world, capsys, tmp_path):
    code, out, err = run_main(evaluate.main, ["--checkpoint", "convnet-w8", "--dataset", "digits"], capsys)
    assert code == 2 and out == "" and err.startswith("error: ") and "untrained architecture" in err
    code, _, err = run_main(evaluate.main, ["--checkpoint", str(tmp_path / "x.pt"), "--dataset", "digits"], capsys)
    assert code == 2 and "checkpoint not found" in err
    code, _, err = run_main(evaluate.main, ["--checkpoint", str(world.teacher), "--dataset", "nope"], capsys)
    assert code == 2 and "unknown dataset" in err
