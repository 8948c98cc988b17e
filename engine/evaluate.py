"""Measure a classifier on a real test split and print one JSON line.

    python -m engine.evaluate --teacher default --dataset mnist
    python -m engine.evaluate --teacher fashion --dataset fashion-mnist    # the fashion world's teacher (half A)
    python -m engine.evaluate --checkpoint runs/x/student.safetensors --arch convnet2-w16 --dataset mnist
    python -m engine.evaluate --checkpoint runs/x/student.safetensors --dataset fashion-mnist --per-class \
        --agreement fashion      # per-class accuracy, and agreement with the teacher overall and per class
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from engine.datasets import DatasetInfo, TensorImageDataset, load_dataset
from engine.errors import UserError, exits_cleanly


@torch.no_grad()
def predictions(model: nn.Module, dataset: Dataset, info: DatasetInfo, batch_size: int = 1000,
                mean=None, std=None, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, true labels) over ``dataset``, on the CPU, with the classifier's normalisation
    (``info``'s unless given)."""
    was_training = model.training
    model.eval()
    mean = torch.tensor(mean or info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std or info.std, device=device).view(1, -1, 1, 1)
    if isinstance(dataset, TensorImageDataset):
        batches = ((dataset.images[i : i + batch_size].float() / 255, dataset.labels[i : i + batch_size])
                   for i in range(0, len(dataset), batch_size))
    else:
        batches = DataLoader(dataset, batch_size=batch_size, num_workers=0)
    preds, truth = [], []
    for images, labels in batches:
        preds.append(model((images.to(device) - mean) / std).argmax(1).cpu())
        truth.append(torch.as_tensor(labels))
    model.train(was_training)
    if not preds:  # an empty split
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(preds), torch.cat(truth)


def accuracy(model: nn.Module, dataset: Dataset, info: DatasetInfo, batch_size: int = 1000,
             mean=None, std=None, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy (a fraction) with the classifier's normalisation (``info``'s unless given)."""
    preds, labels = predictions(model, dataset, info, batch_size, mean, std, device)
    return fraction(preds == labels)


def fraction(hits: torch.Tensor) -> float:
    """The share of True in ``hits`` (0 for none)."""
    return hits.sum().item() / max(len(hits), 1)


def per_class(hits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """The mean of ``hits`` (bool per example) within each true class (None for a class with no example)."""
    return [round(hits[labels == k].float().mean().item(), 4) if (labels == k).any() else None
            for k in range(num_classes)]


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    from engine.classifiers import resolve_classifier

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--teacher", help="a pretrained name (default, fashion) or a checkpoint path")
    who.add_argument("--checkpoint", help="a checkpoint path or a pretrained name")
    parser.add_argument("--arch", help="architecture of the checkpoint when no JSON sidecar names it")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--per-class", action="store_true", help="also the accuracy within each true class")
    parser.add_argument("--agreement", metavar="CLASSIFIER", help="also how often the predictions match this "
                        "classifier's (a student against its teacher: a pretrained name or a checkpoint), overall "
                        "and, with --per-class, within each true class")
    args = parser.parse_args(argv)
    spec = args.teacher or args.checkpoint or "default"
    test_set, info = load_dataset(args.dataset, args.split, root=args.data_root)
    resolved = resolve_classifier(spec, info, args.arch)
    if resolved.checkpoint is None:
        raise UserError(f"'{spec}' names an untrained architecture; pass a checkpoint to evaluate")
    preds, labels = predictions(resolved.model, test_set, info, mean=resolved.mean, std=resolved.std)
    result = {"accuracy": fraction(preds == labels), "dataset": args.dataset,
              "split": args.split, "n": len(test_set), "checkpoint": resolved.checkpoint, "arch": resolved.arch}
    if args.per_class:
        result["per_class_accuracy"] = per_class(preds == labels, labels, info.num_classes)
    if args.agreement:
        other = resolve_classifier(args.agreement, info)
        if other.checkpoint is None:
            raise UserError(f"--agreement '{args.agreement}' names an untrained architecture; pass a checkpoint")
        other_preds, _ = predictions(other.model, test_set, info, mean=other.mean, std=other.std)
        result["agreement"] = fraction(preds == other_preds)
        if args.per_class:
            result["per_class_agreement"] = per_class(preds == other_preds, labels, info.num_classes)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
