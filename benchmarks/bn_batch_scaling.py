"""``python -m benchmarks.bn_batch_scaling``: does the per-sample latent step of L_bn depend on the batch size?

The guided step is ``z_i ← z_i − η·B·∂L_inv/∂z_i`` (engine/synthesis/guided.py). For a per-sample term (a batch mean of
ℓ_i) that is ``η·∂ℓ_i/∂z_i`` whatever B is. L_bn is a batch statistic: ``μ_B = (1/B)·Σ_i f(x_i)``, so
``∂L_bn/∂z_i`` is O(1/B) and ``B·∂L_bn/∂z_i`` is O(1): with the B factor each sample's pull toward the running
statistics is batch-size invariant, and without it (the weight α "unscaled") it would shrink as 1/B.

This measures it on the default world: the first guided step (the defaults' α·L_bn only, β = γ = 0) of the same
seeds at several micro-batch sizes, and reports the RMS of each sample's latent step, as the engine computes it
(``scaled_by_batch``) and as it would be without the B factor on L_bn (``unscaled``, = scaled / B). Writes
``benchmarks/results/bn_batch_scaling.json``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import RESULTS_DIR, run_metadata, write_results
from engine.config import RunConfig
from engine.datasets import load_dataset
from engine.world import guided_sampler, load_teacher


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bn_batch_scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 50, 100])
    parser.add_argument("--out", default=str(RESULTS_DIR / "bn_batch_scaling.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = RunConfig(cls=0.0, adv=0.0, use_cutmix=False).resolved()
    _, info = load_dataset(cfg.dataset, "test")
    device = torch.device("cpu")
    teacher, view = load_teacher(cfg, info, device)
    sampler = guided_sampler(cfg, info, teacher, view, device)
    rows = []
    for b in args.batches:
        batch = sampler.start(*micro_batch_of(cfg, b, info))
        z_before = batch.z.clone()
        sampler.guidance_step(batch, batch.scheduler.timesteps[0], None)
        step = (z_before - batch.z).flatten(1).pow(2).mean(1).sqrt()  # (B,) per-sample RMS
        first = step[: min(args.batches)]  # the samples every batch size shares
        rows.append({"batch": b, "scaled_by_batch_rms": float(first.mean()), "unscaled_rms": float(first.mean() / b),
                     "bn": float(batch.last_terms["bn"])})
        print(rows[-1])
    results = {"rows": rows} | run_metadata("benchmarks.bn_batch_scaling", argv)
    write_results(results, args.out)
    return results


def micro_batch_of(cfg: RunConfig, size: int, info) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` images of micro-batch 0 (same seeds and classes for every size)."""
    ids = torch.arange(size)
    return ids % info.num_classes, cfg.seed * 10_000_000 + ids


if __name__ == "__main__":
    main()
