"""Train a classifier on a real train split: the default world's MNIST teacher, or any zoo model on any dataset.

    python -m engine.train_teacher --arch convnet-w64 --dataset mnist --epochs 3 --out models/weights/teacher-mnist
    python -m engine.train_teacher --dataset cifar10 --data-root ~/data --epochs 30     # resnet18, crops and flips

Defaults follow the data: grayscale digits get a convnet, a shift of 2 px and no flips (a mirrored 3 is no 3);
RGB datasets a CIFAR-style resnet18, random crops with a padding of 1/8 of the size (4 px at 32 px) and flips.

Writes ``<out>.safetensors`` and ``<out>.json`` (provenance: data, steps, seed, test accuracy). The same script
trains the "student from scratch on real data" baseline and the weaker teachers of the teacher-strength study.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from augment.student_augment import student_augment
from engine.checkpoints import atomic_save_safetensors, atomic_write_json
from engine.datasets import as_tensors, load_dataset, split_provenance
from engine.errors import UserError, exits_cleanly
from engine.evaluate import accuracy
from engine.logs import setup_logging
from models.base import count_parameters
from models.registry import build_classifier

log = logging.getLogger(__name__)


def machine_record() -> dict:
    """Where and when weights were trained, for their provenance file."""
    return {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} thread(s)", "date": datetime.date.today().isoformat()}


def train_classifier(arch: str, dataset: str, split: str, epochs: float, batch_size: int = 128, lr: float = 3e-3,
                     seed: int = 0, shift: int = 2, limit: int | None = None, root: str | None = None,
                     flip: bool = False, device: str = "cpu"):
    torch.manual_seed(seed)
    train_set, info = load_dataset(dataset, split, root=root)
    images, labels = as_tensors(train_set, limit)
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    try:
        model = build_classifier(arch, info.num_classes, info.channels).to(device)
    except (KeyError, ValueError) as err:
        raise UserError(f"--arch {arch}: {err.args[0]}") from None
    steps = max(1, int(epochs * len(images) / batch_size))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    start = time.time()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,))
        x = (student_augment(images[idx].to(device), shift, flip) - mean) / std
        loss = F.cross_entropy(model(x), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            log.info("step %d/%d loss %.4f", step + 1, steps, loss.item())
    model.eval()
    provenance = {
        "arch": arch, "dataset": dataset, "train_split": split, "train_images": len(images), "epochs": epochs,
        "steps": steps, "batch_size": batch_size, "optimizer": f"Adam one-cycle max_lr={lr}",
        "augmentation": f"random shift <= {shift} px" + (", horizontal flips" if flip else ""),
        "seed": seed, "parameters": count_parameters(model),
        "train_seconds": round(time.time() - start, 1), "class_names": list(info.class_names),
        "mean": list(info.mean), "std": list(info.std), "in_channels": info.channels, "image_size": info.image_size,
        **split_provenance(dataset, split, root=root), **machine_record(),
    }
    return model, provenance


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="zoo name, tv:NAME or module:callable (default: convnet-w64 "
                        "for grayscale datasets, resnet18 for RGB ones)")
    parser.add_argument("--dataset", default="mnist", help="as engine.run --dataset (default: mnist)")
    parser.add_argument("--data-root", default=None, help="root of locally downloaded datasets (default: $DFKD_DATA)")
    parser.add_argument("--split", default=None, help="train split (default: trainval for mnist, the standard 60k; "
                        "train otherwise)")
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over the train split (default: 3)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate, one-cycle (default: 3e-3)")
    parser.add_argument("--shift", type=int, default=None, help="random-crop padding in px (default: 2 for "
                        "grayscale, 1/8 of the image size for RGB: 4 at 32 px)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="random horizontal flips (default: on for RGB datasets, off for grayscale ones)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one) | cpu | cuda | cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batches (default: 0)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--out", type=Path, default=None, help="writes OUT.safetensors and OUT.json (default: "
                        "teachers/DATASET-ARCH)")
    args = parser.parse_args(argv)
    setup_logging()
    test_set, info = load_dataset(args.dataset, "test", root=args.data_root)  # first: missing data fails at once
    rgb = info.channels == 3
    arch = args.arch or ("resnet18" if rgb else "convnet-w64")
    split = args.split or ("trainval" if args.dataset == "mnist" else "train")
    shift = args.shift if args.shift is not None else (info.image_size // 8 if rgb else 2)
    flip = args.flip if args.flip is not None else rgb
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu (or auto)")
    name = f"{Path(args.dataset.split(':', 1)[-1]).name}-{arch}"  # imagefolder:/data/pets -> pets-resnet18
    out = args.out or Path("teachers") / re.sub(r"[^A-Za-z0-9_-]+", "-", name)
    model, provenance = train_classifier(arch, args.dataset, split, args.epochs, args.batch_size, args.lr,
                                         args.seed, shift=shift, limit=args.limit, root=args.data_root, flip=flip,
                                         device=device)
    provenance["test_accuracy"] = accuracy(model, test_set, info, device=device)
    provenance["command"] = "python -m engine.train_teacher " + " ".join(argv if argv is not None else sys.argv[1:])
    model.cpu()
    atomic_save_safetensors(model.state_dict(), out.with_suffix(".safetensors"))
    atomic_write_json(provenance, out.with_suffix(".json"))
    log.info("test accuracy %.4f -> %s", provenance["test_accuracy"], out.with_suffix(".safetensors"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
