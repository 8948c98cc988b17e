"""Adapters that give foreign classifiers the ``StagedClassifier`` interface (see ``models/base.py``).

- ``TorchvisionClassifier`` (``tv:NAME``): any torchvision classification model, random weights. Stage features are
  read by forward hooks on the model's natural trunk: the children of ``.features`` (VGG, AlexNet, MobileNet,
  EfficientNet, ConvNeXt, DenseNet, SqueezeNet), ``.trunk_output`` (RegNet) or ``.layers`` (MNASNet), else the
  model's own children up to its global pooling (ResNet/ResNeXt/Wide-ResNet, ShuffleNet, GoogLeNet). One probe
  forward at construction records each child's output resolution; the stages are the deepest child at each
  resolution, the deepest four kept (for ResNets exactly ``layer1..layer4``). Transformers (ViT, Swin, MaxViT) have no
  such maps: they give logits, and ``return_features=True`` raises.
- ``GenericClassifier`` (``module:callable`` specs): any ``nn.Module``; its one "stage" is the output of the last
  module whose output is a 4-D map before the head, found by hooking every module on the first feature request.

``classifier_weight()`` is the last ``nn.Linear``'s weight; it raises when that layer does not read the last stage
directly (an MLP head, as in VGG or MobileNetV3), because then no class activation map exists.

Hooks live only inside a ``FeatureCapture`` context around a single forward: nothing stays registered, so deep
copies (EMA, weight snapshots) and deleted wrappers leave no hooks behind, and plain forwards pay nothing.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from types import TracebackType

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from models.base import StagedClassifier

log = logging.getLogger(__name__)

TRUNK_ATTRS = ("features", "trunk_output", "layers")
TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit")
GLOBAL_POOL_TYPES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
POOL_TYPES = (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)
HEAD_TYPES = (*GLOBAL_POOL_TYPES, nn.Flatten, nn.Linear, nn.Dropout)
MAX_STAGES = 4
NO_FEATURES_HINT = "the mSARC loss needs stage features (use --no-msarc)"


class FeatureCapture:
    """Owns forward hooks on ``modules`` for the span of a ``with`` block.

    ``records`` lists ``(name, output)`` in completion order (containers complete after their children);
    ``outputs`` maps each name to its last tensor output, so a module called twice reports its final call.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.records: list[tuple[str, torch.Tensor]] = []
        self.handles: list[RemovableHandle] = []

    def __enter__(self) -> FeatureCapture:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._recorder(name)))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _recorder(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            if isinstance(output, torch.Tensor):
                self.records.append((name, output))

        return hook

    @property
    def outputs(self) -> dict[str, torch.Tensor]:
        return dict(self.records)


def logits_of(output) -> torch.Tensor:
    """Logits from a model output: a tensor, ``.logits``, or a tuple led by logits (GoogLeNet, Inception)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def checked_head_weight(arch: str, head: nn.Linear | None, last_channels: int | None) -> torch.Tensor:
    if head is None:
        raise ValueError(f"'{arch}' has no nn.Linear classifier, so no class activation map; {NO_FEATURES_HINT}")
    if last_channels is not None and head.in_features != last_channels:
        raise ValueError(
            f"'{arch}': the last linear layer reads {head.in_features} features but the last stage has "
            f"{last_channels} channels (an MLP head), so no class activation map exists; {NO_FEATURES_HINT}"
        )
    return head.weight


def replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first ``nn.Conv2d`` for a fresh one reading ``in_channels`` (e.g. 1-channel 28x28 digits)."""
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def find_stages(model: nn.Module, in_channels: int, probe_size: int) -> tuple[list[str], int | None]:
    """Stage module names (shallow to deep) and the last stage's channels, from one eval-mode probe forward."""
    trunk_attr = next((a for a in TRUNK_ATTRS if isinstance(getattr(model, a, None), nn.Sequential)), None)
    trunk = model if trunk_attr is None else getattr(model, trunk_attr)
    prefix = "" if trunk_attr is None else f"{trunk_attr}."
    candidates: dict[str, nn.Module] = {}
    for child_name, child in trunk.named_children():
        if isinstance(child, HEAD_TYPES):
            break
        candidates[prefix + child_name] = child
    was_training = model.training
    model.eval()  # the probe must not touch BatchNorm running statistics
    try:
        with FeatureCapture(candidates) as capture, torch.no_grad():
            model(torch.zeros(1, in_channels, probe_size, probe_size))
    finally:
        model.train(was_training)
    deepest_at: dict[tuple[int, int], tuple[str, int]] = {}  # resolution -> (name, channels); resolutions only shrink
    for name, output in capture.records:
        if output.dim() == 4:
            deepest_at[tuple(output.shape[-2:])] = (name, output.shape[1])
    stages = list(deepest_at.values())[-MAX_STAGES:]
    return [name for name, _ in stages], (stages[-1][1] if stages else None)


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


class TorchvisionClassifier(nn.Module):
    """A torchvision classification model by name (random weights) behind the staged-classifier interface."""

    state_prefix = "model."  # checkpoints of the bare torchvision model load after this prefix is added

    def __init__(self, name: str, num_classes: int, in_channels: int = 3):
        super().__init__()
        import torchvision

        if name not in torchvision_names():
            raise KeyError(f"unknown torchvision model '{name}'; known: {', '.join(torchvision_names())}")
        self.arch = f"tv:{name}"
        self.model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        replace_first_conv(self.model, in_channels)
        self.stage_names: list[str] = []
        self.last_channels: int | None = None
        if not name.startswith(TRANSFORMER_PREFIXES):
            probe_size = 299 if name == "inception_v3" else 64  # Inception's stem needs at least 75 px
            self.stage_names, self.last_channels = find_stages(self.model, in_channels, probe_size)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if not return_features:
            return logits_of(self.model(x))
        if not self.stage_names:
            raise ValueError(f"'{self.arch}' exposes no convolutional stage maps; {NO_FEATURES_HINT}")
        modules = {n: self.model.get_submodule(n) for n in self.stage_names}
        with FeatureCapture(modules) as capture:
            logits = logits_of(self.model(x))
        outputs = capture.outputs
        return logits, [outputs[n] for n in self.stage_names]

    def classifier_weight(self) -> torch.Tensor:
        return checked_head_weight(self.arch, last_linear(self.model), self.last_channels)


class GenericClassifier(nn.Module):
    """Any classifier ``nn.Module``; its feature is the last 4-D module output before the head.

    The feature module is found on the first ``return_features=True`` call by hooking every module for that one
    forward (its features are returned as usual, no extra forward, BatchNorm statistics untouched); later calls hook
    only that module. Global pools and pools down to 1x1 are skipped: their output is the head's input, not a map.
    """

    state_prefix = "model."

    def __init__(self, model: nn.Module, arch: str = "module"):
        super().__init__()
        self.model = model
        self.arch = arch
        self.feature_name: str | None = None  # None: not searched yet; "": searched, none found

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if not return_features:
            return logits_of(self.model(x))
        if self.feature_name is None:
            modules = {n: m for n, m in self.model.named_modules() if n}
            with FeatureCapture(modules) as capture:
                logits = logits_of(self.model(x))
            self.feature_name = ""
            for name, output in capture.records:
                if output.dim() != 4 or isinstance(modules[name], GLOBAL_POOL_TYPES):
                    continue
                if isinstance(modules[name], POOL_TYPES) and output.shape[-2:].numel() == 1:
                    continue
                self.feature_name, feature = name, output
            if not self.feature_name:
                raise ValueError(f"'{self.arch}': no module outputs a 4-D feature map; {NO_FEATURES_HINT}")
            return logits, [feature]
        if not self.feature_name:
            raise ValueError(f"'{self.arch}': no module outputs a 4-D feature map; {NO_FEATURES_HINT}")
        with FeatureCapture({self.feature_name: self.model.get_submodule(self.feature_name)}) as capture:
            logits = logits_of(self.model(x))
        return logits, [capture.outputs[self.feature_name]]

    def classifier_weight(self) -> torch.Tensor:
        return checked_head_weight(self.arch, last_linear(self.model), None)


def is_staged(model: nn.Module) -> bool:
    """A ``StagedClassifier``, or a module that follows its interface without subclassing it."""
    if isinstance(model, StagedClassifier):
        return True
    try:
        accepts_flag = "return_features" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return accepts_flag and callable(getattr(model, "classifier_weight", None))


def accepts_keyword(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_from_spec(spec: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """``"pkg.module:make_net"`` -> ``make_net(num_classes=..., [in_channels=...])``, wrapped unless already staged."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"classifier spec '{spec}' is not of the form 'module:callable'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or anything the module raises while importing
        reason = (str(err).splitlines() or [""])[0]
        raise ValueError(f"cannot import module '{module_name}' for '{spec}': {type(err).__name__}: {reason}") from err
    target = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(f"module '{module_name}' has no attribute '{attr}' (from '{spec}')")
    if not callable(target):
        raise ValueError(f"'{attr}' in module '{module_name}' is not callable (from '{spec}')")
    kwargs = {"num_classes": num_classes}
    if accepts_keyword(target, "in_channels"):
        kwargs["in_channels"] = in_channels
    elif in_channels != 3:
        log.warning("%s takes no in_channels argument; the data has %d channels", spec, in_channels)
    model = target(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"'{spec}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model if is_staged(model) else GenericClassifier(model, spec)
