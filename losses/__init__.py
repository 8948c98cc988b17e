"""Loss terms of the engine (SPEC §2 step 3 and §3): tensors in, tensor out; nothing here imports ``engine``."""

from losses.adversarial import DIVERGENCES, adversarial_loss
from losses.bn_stats import BNStatHooks, bn_stat_distance
from losses.class_prior import boundary_targets, class_prior_loss
from losses.kd_kl import kd_kl_loss, kd_kl_per_sample
from losses.msarc import class_activation_map, msarc_loss, spatial_attention
from losses.weighted_sum import WeightedSum

__all__ = [
    "DIVERGENCES",
    "BNStatHooks",
    "WeightedSum",
    "adversarial_loss",
    "bn_stat_distance",
    "boundary_targets",
    "class_activation_map",
    "class_prior_loss",
    "kd_kl_loss",
    "kd_kl_per_sample",
    "msarc_loss",
    "spatial_attention",
]
