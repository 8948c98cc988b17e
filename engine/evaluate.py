"""Measure a classifier on a real test split and print one JSON line.

    python -m engine.evaluate --teacher default --dataset mnist
    python -m engine.evaluate --teacher fashion --dataset fashion-mnist    # the fashion world's teacher (half A)
    python -m engine.evaluate --checkpoint runs/x/student.safetensors --arch convnet2-w16 --dataset mnist
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
def accuracy(model: nn.Module, dataset: Dataset, info: DatasetInfo, batch_size: int = 1000,
             mean=None, std=None, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy (a fraction) with the classifier's normalisation (``info``'s unless given)."""
    was_training = model.training
    model.eval()
    mean = torch.tensor(mean or info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std or info.std, device=device).view(1, -1, 1, 1)
    if isinstance(dataset, TensorImageDataset):
        batches = ((dataset.images[i : i + batch_size].float() / 255, dataset.labels[i : i + batch_size])
                   for i in range(0, len(dataset), batch_size))
    else:
        batches = DataLoader(dataset, batch_size=batch_size, num_workers=0)
    correct = total = 0
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        correct += (model((images - mean) / std).argmax(1) == labels).sum().item()
        total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)


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
    args = parser.parse_args(argv)
    spec = args.teacher or args.checkpoint or "default"
    test_set, info = load_dataset(args.dataset, args.split, root=args.data_root)
    resolved = resolve_classifier(spec, info, args.arch)
    if resolved.checkpoint is None:
        raise UserError(f"'{spec}' names an untrained architecture; pass a checkpoint to evaluate")
    acc = accuracy(resolved.model, test_set, info, mean=resolved.mean, std=resolved.std)
    print(json.dumps({"accuracy": acc, "dataset": args.dataset, "split": args.split, "n": len(test_set),
                      "checkpoint": resolved.checkpoint, "arch": resolved.arch}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
