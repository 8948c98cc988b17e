"""mSARC: multi-stage spatial-attention and class-activation-map consistency (SPEC §3, ``μ·L_mSARC``).

DiffDFKD (Qi et al. 2025) names a CAM-consistency term, but its formula is not available to this project, so this
is **the project's own definition** (SPEC §3), assembled from two published pieces:

- spatial attention (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017)::

      a(F) = normalize(flatten(mean_c F_c²))                                  F: (B, C, H, W) -> a: (B, H·W)

- class activation map (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016) at the
  last stage, for the teacher's top class ``ŷ = argmax z_T`` (the student uses the same ŷ with its own fc weight)::

      CAM(F, w) = normalize(flatten(ReLU(Σ_c w[ŷ, c] · F_c)))

- the loss over the last ``K = min(#S stages, #T stages)`` stages, paired deepest with deepest::

      L_mSARC = Σ_k mean_b ‖a_k^S − a_k^T‖² + mean_b ‖CAM^S − CAM^T‖²

When a student and teacher map differ in spatial size, the larger 2-D map (attention or CAM, before flattening and
normalisation) is reduced to the smaller size with adaptive average pooling, then both are normalised. Teacher-side
tensors are detached. Normalisation uses a small eps, so an all-zero map (e.g. a fully negative CAM) becomes zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, reduce

_EPS = 1e-12


def _attention_map(feature: torch.Tensor) -> torch.Tensor:
    """``mean_c F²`` as a 2-D map: (B, C, H, W) -> (B, H, W)."""
    return reduce(feature.pow(2), "b c h w -> b h w", "mean")


def _cam_map(feature: torch.Tensor, fc_weight: torch.Tensor, class_idx: torch.Tensor) -> torch.Tensor:
    """``ReLU(Σ_c w[ŷ_b, c]·F_b,c)`` as a 2-D map: (B, C, H, W), (K, C), (B,) -> (B, H, W)."""
    if fc_weight.shape[1] != feature.shape[1]:
        raise ValueError(f"fc weight has {fc_weight.shape[1]} input channels, the feature map {feature.shape[1]}")
    class_weights = fc_weight[class_idx]  # (B, C)
    return F.relu(einsum(class_weights, feature, "b c, b c h w -> b h w"))


def _flatten_normalize(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, H·W), each row scaled to unit L2 norm (zero rows stay zero)."""
    return F.normalize(rearrange(maps, "b h w -> b (h w)"), p=2, dim=1, eps=_EPS)


def _match_and_flatten(student_map: torch.Tensor, teacher_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool whichever 2-D map is larger down to the common (smallest) size, then flatten and normalise both."""
    size = (min(student_map.shape[-2], teacher_map.shape[-2]), min(student_map.shape[-1], teacher_map.shape[-1]))
    if tuple(student_map.shape[-2:]) != size:
        student_map = F.adaptive_avg_pool2d(student_map, size)  # (B, h, w) pools as (C=B, H, W): per sample
    if tuple(teacher_map.shape[-2:]) != size:
        teacher_map = F.adaptive_avg_pool2d(teacher_map, size)
    return _flatten_normalize(student_map), _flatten_normalize(teacher_map)


def _mean_squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean_b ‖a_b − b_b‖₂²`` for (B, D) inputs."""
    return (a - b).pow(2).sum(dim=1).mean()


def _check_feature(feature: torch.Tensor, name: str) -> None:
    if feature.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W) stage maps, got shape {tuple(feature.shape)}")


def spatial_attention(feature: torch.Tensor) -> torch.Tensor:
    """Attention map ``normalize(flatten(mean_c F²))``: (B, C, H, W) -> (B, H·W)."""
    _check_feature(feature, "feature")
    return _flatten_normalize(_attention_map(feature))


def class_activation_map(feature: torch.Tensor, fc_weight: torch.Tensor, class_idx: torch.Tensor) -> torch.Tensor:
    """CAM ``normalize(flatten(ReLU(Σ_c w[ŷ, c]·F_c)))``: (B, C, H, W), (K, C), (B,) -> (B, H·W)."""
    _check_feature(feature, "feature")
    return _flatten_normalize(_cam_map(feature, fc_weight, class_idx))


def msarc_loss(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    student_fc_weight: torch.Tensor,
    teacher_fc_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
) -> torch.Tensor:
    """``Σ_k mean_b ‖a_k^S − a_k^T‖² + mean_b ‖CAM^S − CAM^T‖²`` over the last K matched stages (see module doc).

    Features are lists of (B, C_k, H_k, W_k) stage maps from shallow to deep; fc weights are (K_classes, C_last).
    """
    num_stages = min(len(student_features), len(teacher_features))
    if num_stages == 0:
        raise ValueError("msarc_loss needs at least one stage feature from both student and teacher")
    student_features = list(student_features)[-num_stages:]
    teacher_features = [f.detach() for f in list(teacher_features)[-num_stages:]]
    for s_feat, t_feat in zip(student_features, teacher_features):
        _check_feature(s_feat, "student features")
        _check_feature(t_feat, "teacher features")

    total = 0
    for s_feat, t_feat in zip(student_features, teacher_features):
        a_s, a_t = _match_and_flatten(_attention_map(s_feat), _attention_map(t_feat))  # (B, h·w) each
        total = total + _mean_squared_distance(a_s, a_t)

    top_class = teacher_logits.detach().argmax(dim=1)  # (B,) ŷ, shared by both CAMs
    cam_s, cam_t = _match_and_flatten(
        _cam_map(student_features[-1], student_fc_weight, top_class),
        _cam_map(teacher_features[-1], teacher_fc_weight.detach(), top_class),
    )
    return total + _mean_squared_distance(cam_s, cam_t)
