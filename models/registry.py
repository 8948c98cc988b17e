"""The model zoo: classifiers registered by name, plus checkpoint loading with clear errors.

    build_classifier("convnet-w64", num_classes=10, in_channels=1)
    build_classifier("wrn-40-2", num_classes=100)              # the CIFAR zoo: resnet8/20/18/34, wrn-*, vgg*-bn
    build_classifier("tv:mobilenet_v3_small", num_classes=10)  # any torchvision classifier, random weights
    build_classifier("mypkg.nets:make_net", num_classes=10)    # any callable taking num_classes (and in_channels)
    load_classifier("convnet-w64", "teacher.safetensors", num_classes=10, in_channels=1)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from models.adapters import TorchvisionClassifier, build_from_spec
from models.cifar_resnet import RESNETS
from models.convnet import convnet
from models.vgg import VGGS
from models.wide_resnet import WIDE_RESNETS

MODELS: dict[str, Callable[..., nn.Module]] = {
    "convnet-w8": convnet(8),
    "convnet-w16": convnet(16),
    "convnet-w32": convnet(32),
    "convnet-w64": convnet(64),
    "convnet2-w8": convnet(8, convs_per_stage=2),
    "convnet2-w16": convnet(16, convs_per_stage=2),
    "convnet2-w32": convnet(32, convs_per_stage=2),
    **RESNETS,
    **WIDE_RESNETS,
    **VGGS,
}
TORCHVISION_PREFIX = "tv:"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested architecture (message names both)."""


def describe_models() -> list[str]:
    """The registered zoo names; ``tv:NAME`` and ``module:callable`` specs are accepted besides these."""
    return sorted(MODELS)


def build_classifier(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    if name in MODELS:
        return MODELS[name](num_classes=num_classes, in_channels=in_channels)
    if name.startswith(TORCHVISION_PREFIX):
        return TorchvisionClassifier(name.removeprefix(TORCHVISION_PREFIX), num_classes, in_channels)
    if ":" in name:
        return build_from_spec(name, num_classes, in_channels)
    raise KeyError(
        f"unknown architecture '{name}'; known: {', '.join(describe_models())}; "
        f"or tv:NAME for a torchvision model, or module:callable"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state_dict, ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper, or a ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or truncated files raise many different errors
        raise CheckpointError(f"cannot read checkpoint {path} ({type(err).__name__}); is it a complete file?") from err
    for key in ("state_dict", "model", "student"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        empty = " (it is empty)" if obj == {} else ""
        raise CheckpointError(f"{path} holds no state_dict{empty}; expected a dict of tensors or "
                              "{'state_dict': ...}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, path: str | Path, arch: str) -> nn.Module:
    """Load a checkpoint strictly; a mismatch names the architecture and the first mismatched key.

    Adapters (``tv:``, ``module:callable``) hold the wrapped model under ``state_prefix``; checkpoints of the bare
    model get that prefix added. A missing BatchNorm ``num_batches_tracked`` counter (older checkpoints) is allowed.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    prefix = getattr(model, "state_prefix", "")
    if prefix and not any(k.startswith(prefix) for k in state):
        state = {prefix + k: v for k, v in state.items()}
    for key, value in own.items():
        if key not in state and key.endswith("num_batches_tracked"):
            state[key] = value
        if key not in state:
            raise CheckpointError(f"checkpoint {path} does not fit '{arch}': key '{key}' is missing")
        if state[key].shape != value.shape:
            raise CheckpointError(
                f"checkpoint {path} does not fit '{arch}': '{key}' has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(value.shape)}"
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise CheckpointError(f"checkpoint {path} does not fit '{arch}': unexpected key '{extra[0]}'")
    model.load_state_dict(state)
    return model


def load_classifier(name: str, checkpoint: str | Path | None, num_classes: int, in_channels: int = 3) -> nn.Module:
    model = build_classifier(name, num_classes, in_channels)
    return load_weights(model, checkpoint, name) if checkpoint else model
