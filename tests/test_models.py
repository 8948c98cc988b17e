"""The classifier zoo, the torchvision and ``module:callable`` adapters, and checkpoint loading. CPU, batch 2."""

from __future__ import annotations

import copy

import pytest
import torch
from einops import reduce
from safetensors.torch import save_file
from torch import nn

from models.adapters import GenericClassifier, TorchvisionClassifier
from models.base import StagedClassifier, count_parameters
from models.convnet import ConvNet
from models.registry import CheckpointError, build_classifier, describe_models, load_classifier, load_weights


def make_tiny(num_classes: int, in_channels: int = 3) -> nn.Module:
    """A plain Sequential classifier, as a user's ``module:callable`` would return."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, num_classes),
    )


def make_staged(num_classes: int, in_channels: int) -> ConvNet:
    return ConvNet(num_classes, in_channels, width=4)


def make_mlp(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))


def sample_input(name: str) -> torch.Tensor:
    return torch.randn(2, 1, 28, 28) if name.startswith("convnet") else torch.randn(2, 3, 32, 32)


def cam_head(model: nn.Module, feature: torch.Tensor) -> torch.Tensor:
    """fc(global_avg_pool(F)): what the CAM computation assumes the logits are."""
    pooled = reduce(feature, "b c h w -> b c", "mean")
    bias = model.fc.bias if hasattr(model, "fc") else 0.0
    return pooled @ model.classifier_weight().T + bias


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", describe_models())
def test_zoo_forward_features_and_cam_head(name):
    torch.manual_seed(0)
    x = sample_input(name)
    model = build_classifier(name, num_classes=10, in_channels=x.shape[1]).eval()
    assert isinstance(model, StagedClassifier)
    with torch.no_grad():
        logits = model(x)
        logits_again, features = model(x, return_features=True)
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits, logits_again)
    assert features and all(f.dim() == 4 and f.shape[0] == 2 for f in features)
    assert features[-1].shape[1] == model.classifier_weight().shape[1]
    torch.testing.assert_close(cam_head(model, features[-1]), logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet20", "wrn-16-1", "vgg8-bn", "resnet18"])
def test_zoo_on_one_channel_28px(name):
    model = build_classifier(name, num_classes=10, in_channels=1)
    logits, features = model(torch.randn(2, 1, 28, 28), return_features=True)
    assert logits.shape == (2, 10) and features[0].shape[-1] == 28


def test_wrn_last_stage_is_post_activation():
    model = build_classifier("wrn-16-1", num_classes=10).eval()
    _, features = model(torch.randn(2, 3, 32, 32), return_features=True)
    assert features[-1].min() >= 0 and len(features) == 3


@pytest.mark.parametrize(("name", "millions"), [("resnet20", 0.27), ("wrn-40-2", 2.2), ("resnet18", 11.2)])
def test_parameter_counts(name, millions):
    assert count_parameters(build_classifier(name, num_classes=10)) / 1e6 == pytest.approx(millions, rel=0.05)


def test_describe_models_and_unknown_name():
    names = describe_models()
    assert names == sorted(names)
    assert {"resnet8", "resnet20", "resnet18", "resnet34", "vgg8-bn", "vgg11-bn", "convnet-w16"} <= set(names)
    assert {"wrn-16-1", "wrn-16-2", "wrn-40-1", "wrn-40-2"} <= set(names)
    with pytest.raises(KeyError, match="resnet20"):
        build_classifier("resnet999", num_classes=10)


# --- torchvision adapter ---------------------------------------------------------------------------------------


def test_torchvision_resnet18_stages_and_cam_head():
    torch.manual_seed(0)
    model = build_classifier("tv:resnet18", num_classes=10).eval()
    assert isinstance(model, TorchvisionClassifier)
    assert model.stage_names == ["layer1", "layer2", "layer3", "layer4"]
    with torch.no_grad():
        logits, features = model(torch.randn(2, 3, 64, 64), return_features=True)
    assert logits.shape == (2, 10)
    assert [tuple(f.shape[1:]) for f in features] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert model.classifier_weight().shape == (10, 512)
    pooled = reduce(features[-1], "b c h w -> b c", "mean")
    torch.testing.assert_close(model.model.fc(pooled), logits, atol=1e-5, rtol=1e-4)
    assert no_hooks_left(model)


def test_torchvision_mobilenet_one_channel_and_mlp_head():
    model = build_classifier("tv:mobilenet_v3_small", num_classes=7, in_channels=1).eval()
    logits, features = model(torch.randn(2, 1, 28, 28), return_features=True)
    assert logits.shape == (2, 7)
    assert len(features) == 4 and all(f.dim() == 4 for f in features)
    assert [f.shape[-1] for f in features] == sorted((f.shape[-1] for f in features), reverse=True)
    with pytest.raises(ValueError, match="--no-msarc"):
        model.classifier_weight()  # Linear(576 -> 1024) -> Hardswish -> Linear: no class activation map
    assert no_hooks_left(model)


def test_torchvision_probe_keeps_batchnorm_stats_and_deepcopy_is_independent():
    model = build_classifier("tv:shufflenet_v2_x0_5", num_classes=10)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.num_batches_tracked.item() == 0 and model.training
    twin = copy.deepcopy(model).eval()
    _, features = twin(torch.randn(2, 3, 32, 32), return_features=True)
    assert len(features) == 4 and no_hooks_left(model) and no_hooks_left(twin)


def test_torchvision_unknown_name():
    with pytest.raises(KeyError, match="resnet18"):
        build_classifier("tv:resnet_nope", num_classes=10)


# --- module:callable specs -------------------------------------------------------------------------------------


def test_module_callable_generic_wrapper():
    torch.manual_seed(0)
    model = build_classifier("tests.test_models:make_tiny", num_classes=5, in_channels=3).eval()
    assert isinstance(model, GenericClassifier)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits, features = model(x, return_features=True)  # finds the feature module
        logits_again, features_again = model(x, return_features=True)  # hooks only that module
    assert model.feature_name == "5"  # the last ReLU, not the global pool
    assert features[-1].shape == (2, 12, 8, 8) and model.classifier_weight().shape == (5, 12)
    torch.testing.assert_close(features_again[-1], features[-1])
    torch.testing.assert_close(logits_again, logits)
    pooled = reduce(features[-1], "b c h w -> b c", "mean")
    torch.testing.assert_close(model.model[-1](pooled), logits, atol=1e-5, rtol=1e-4)
    assert no_hooks_left(model)


def test_module_callable_staged_model_is_not_wrapped():
    model = build_classifier("tests.test_models:make_staged", num_classes=10, in_channels=1)
    assert isinstance(model, ConvNet)


def test_module_callable_without_maps_says_no_msarc():
    model = build_classifier("tests.test_models:make_mlp", num_classes=10)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="--no-msarc"):
        model(torch.randn(2, 3, 8, 8), return_features=True)


@pytest.mark.parametrize(
    ("spec", "named"),
    [("tests.no_such_module:make", "tests.no_such_module"), ("tests.test_models:no_such_fn", "no_such_fn")],
)
def test_bad_module_callable(spec, named):
    with pytest.raises(ValueError, match=named) as err:
        build_classifier(spec, num_classes=10)
    assert "\n" not in str(err.value)


# --- checkpoints -----------------------------------------------------------------------------------------------


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key])


@pytest.mark.parametrize("layout", ["plain.pt", "wrapped.pt", "weights.safetensors", "dataparallel.pt"])
def test_checkpoint_round_trips(tmp_path, layout):
    source = build_classifier("resnet8", num_classes=10)
    state = source.state_dict()
    path = tmp_path / layout
    if layout == "plain.pt":
        torch.save(state, path)
    elif layout == "wrapped.pt":
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif layout == "weights.safetensors":
        save_file(state, str(path))
    else:
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    assert_same_weights(load_classifier("resnet8", path, num_classes=10), source)


def test_adapter_checkpoints_with_and_without_prefix(tmp_path):
    source = build_classifier("tv:mobilenet_v3_small", num_classes=10)
    bare = {k: v for k, v in source.model.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(bare, str(tmp_path / "bare.safetensors"))  # a checkpoint of the torchvision model itself
    torch.save(source.state_dict(), tmp_path / "wrapped.pt")  # a checkpoint of the adapter
    for name in ("bare.safetensors", "wrapped.pt"):
        assert_same_weights(load_classifier("tv:mobilenet_v3_small", tmp_path / name, num_classes=10), source)
    tiny = make_tiny(4)
    torch.save(tiny.state_dict(), tmp_path / "tiny.pt")
    loaded = load_classifier("tests.test_models:make_tiny", tmp_path / "tiny.pt", num_classes=4)
    assert_same_weights(loaded.model, tiny)


def test_mismatched_checkpoints_name_arch_and_key(tmp_path):
    torch.save(build_classifier("resnet8", num_classes=10).state_dict(), tmp_path / "r8.pt")
    with pytest.raises(CheckpointError, match=r"'resnet20'.*key 'stages\.0\.1\."):
        load_classifier("resnet20", tmp_path / "r8.pt", num_classes=10)
    with pytest.raises(CheckpointError, match=r"'resnet8'.*'fc\.weight'"):
        load_classifier("resnet8", tmp_path / "r8.pt", num_classes=100)
    with pytest.raises(CheckpointError, match=r"'tv:resnet18'"):
        load_weights(TorchvisionClassifier("resnet18", 10), tmp_path / "r8.pt", "tv:resnet18")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_checkpoint(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    state = build_classifier("resnet8", num_classes=10).state_dict()
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_classifier("resnet8", path, num_classes=10)
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier("resnet8", tmp_path / "missing.pt", num_classes=10)
