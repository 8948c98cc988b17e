"""Resolve a teacher/student spec from the command line into a model plus its input conventions.

A spec is one of
  * a committed pretrained name (``default`` = the digits world's MNIST teacher, ``fashion`` = the fashion world's
    Fashion-MNIST teacher, trained on half A of its train set),
  * a checkpoint path (``.safetensors`` / ``.pt``); the architecture comes from ``--arch`` or from the JSON
    written beside it by ``engine.train_teacher`` (same stem),
  * a zoo architecture name (an untrained model, for students).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import models
from engine.datasets import DatasetInfo
from engine.errors import UserError
from models.json_files import read_json_object
from models.registry import build_classifier, load_weights

WEIGHTS_DIR = Path(models.__file__).parent / "weights"
PRETRAINED = {"default": "teacher-mnist", "teacher-mnist": "teacher-mnist", "fashion": "teacher-fashion",
              "teacher-fashion": "teacher-fashion"}
DEFAULT_PRIOR = WEIGHTS_DIR / "prior-digits"
PRIORS = {"default": DEFAULT_PRIOR, "digits": DEFAULT_PRIOR, "fashion": WEIGHTS_DIR / "prior-fashion"}  # --prior names


@dataclass
class ClassifierSpec:
    model: nn.Module
    arch: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint: str | None
    provenance: dict

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the normalised input the classifier was trained on."""
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        return (images - mean) / std


def _sidecar(path: Path) -> dict:
    meta = path.with_suffix(".json")
    if not meta.exists():
        return {}
    return read_json_object(meta, UserError, what="the sidecar ")


def resolve_classifier(spec: str, info: DatasetInfo, arch: str | None = None) -> ClassifierSpec:
    """Build (and load) the classifier a spec names, for a dataset with ``info``'s classes and channels."""
    if spec in PRETRAINED:
        path = WEIGHTS_DIR / f"{PRETRAINED[spec]}.safetensors"
        if not path.exists():
            raise UserError(f"the pretrained teacher '{spec}' is missing at {path}; "
                            "run: python -m engine.train_teacher")
    elif Path(spec).suffix in (".safetensors", ".pt", ".pth", ".bin") or Path(spec).exists():
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"checkpoint not found: {path}; pass an existing .safetensors/.pt file")
    else:
        try:
            model = build_classifier(arch or spec, info.num_classes, info.channels)
        except (KeyError, ValueError) as err:
            raise UserError(f"'{spec}' is neither a checkpoint file nor a known architecture: {err.args[0]}") from None
        return ClassifierSpec(model, arch or spec, info.mean, info.std, None, {})
    provenance = _sidecar(path)
    arch = arch or provenance.get("arch")
    if arch is None:
        raise UserError(f"cannot tell the architecture of {path}; pass --arch (engine.evaluate) "
                        "or --teacher-arch (engine.run)")
    num_classes = len(provenance.get("class_names", info.class_names))
    if num_classes != info.num_classes:
        raise UserError(
            f"{path} has {num_classes} classes but dataset '{info.name}' has {info.num_classes}; "
            "pass the dataset the teacher was trained for"
        )
    try:
        model = build_classifier(arch, num_classes, provenance.get("in_channels", info.channels))
        load_weights(model, path, arch)
    except (KeyError, ValueError) as err:  # unknown architecture, bad module:callable, CheckpointError
        raise UserError(err.args[0]) from None
    mean = tuple(provenance.get("mean", info.mean))
    std = tuple(provenance.get("std", info.std))
    return ClassifierSpec(model.eval(), arch, mean, std, str(path), provenance)
