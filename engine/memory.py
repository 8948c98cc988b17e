"""``--memory-target-gb``: fit the guided step, the peak of a run's memory, under a GPU memory target by measuring.

The guided step holds the graph of one micro-batch (prior on 2B inputs for classifier-free guidance, decoder,
teacher, student) until its backward pass; two settings of the sampler trade time for that memory without changing
the per-sample update (engine/synthesis/guided.py, ``GuidedSampler.latent_gradient``): ``grad_chunk`` (forward +
backward on c samples at a time) and ``grad_checkpointing`` (the prior recomputes its activations during the backward
pass).
Measured, not modelled: activation sizes depend on the prior, the attention kernels and the autocast dtype.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import torch

from engine.config import RunConfig
from engine.errors import UserError
from engine.sampler import GuidedSampler

log = logging.getLogger(__name__)


def guided_step_peak(sampler: GuidedSampler, labels: torch.Tensor, seeds: torch.Tensor, student, device) -> float:
    """Peak bytes allocated on ``device`` (``torch.cuda.max_memory_allocated``, everything already resident
    included) during one guided step of a fresh micro-batch with the sampler's current settings; inf on OOM."""
    batch = sampler.start(labels, seeds)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        sampler.step(batch, student)
        torch.cuda.synchronize(device)
        peak = float(torch.cuda.max_memory_allocated(device))
    except torch.cuda.OutOfMemoryError:
        peak = math.inf
    del batch
    torch.cuda.empty_cache()
    return peak


def fit_memory_target(cfg: RunConfig, world, accelerator) -> RunConfig:
    """The config with the largest ``grad_chunk`` whose measured guided step stays under ``cfg.memory_target_gb``.

    Tries ``--grad-chunk`` (0: the whole ``--gen-batch``), then halves it down to 1; if not even one sample at a
    time fits, turns ``grad_checkpointing`` on and searches again from the top. Each try is one guided step (the
    heaviest kind: L_adv on, as after its warm-up) under the run's autocast, so the peak counts the models already
    on the GPU; the replay buffer and the student's optimizer state come later: leave them headroom. Sets the
    sampler's config and returns the config to record; a target nothing meets is a :class:`UserError`. Off on CPU
    (a warning: process memory is not measured there, ``--grad-chunk`` is used as given).
    """
    sampler = world.generator
    if not cfg.memory_target_gb or not isinstance(sampler, GuidedSampler):
        return cfg
    device = accelerator.device
    if device.type != "cuda":
        log.warning("--memory-target-gb is measured only on CUDA; on %s --grad-chunk %d is used as given",
                    device.type, cfg.grad_chunk)
        return cfg
    target = cfg.memory_target_gb * 2**30
    labels, seeds = torch.arange(cfg.gen_batch) % world.info.num_classes, torch.arange(cfg.gen_batch)
    student = copy.deepcopy(world.student).eval().requires_grad_(False)
    saved = dataclasses.replace(sampler.config)
    sampler.set_weights(adv=cfg.adv)
    found, lowest = None, math.inf
    try:
        for checkpointing in (True,) if cfg.grad_checkpointing else (False, True):
            chunk = min(cfg.grad_chunk or cfg.gen_batch, cfg.gen_batch)
            while chunk >= 1 and found is None:
                sampler.config.grad_chunk, sampler.config.grad_checkpointing = chunk, checkpointing
                with accelerator.autocast():
                    peak = guided_step_peak(sampler, labels, seeds, student, device)
                log.info("memory target: grad chunk %d%s peaks at %.2f GB", chunk,
                         " with checkpointing" if checkpointing else "", peak / 2**30)
                lowest = min(lowest, peak)
                if peak <= target:
                    found = (chunk, checkpointing, peak)
                chunk //= 2
    finally:
        sampler.set_weights(adv=saved.adv)
        sampler.config.grad_chunk, sampler.config.grad_checkpointing = saved.grad_chunk, saved.grad_checkpointing
        torch.cuda.reset_peak_memory_stats(device)  # the run's gpu_mem_gb should not report the probes
    if found is None:
        raise UserError(f"--memory-target-gb {cfg.memory_target_gb:g}: one guided step peaks at "
                        f"{lowest / 2**30:.2f} GB even one sample at a time with --grad-checkpointing; raise the "
                        "target or lighten the step (--grad-mode detached)")
    chunk, checkpointing, peak = found
    sampler.config.grad_chunk, sampler.config.grad_checkpointing = chunk, checkpointing
    log.info("memory target %.2f GB: --grad-chunk %d of %d%s (guided step peak %.2f GB)", cfg.memory_target_gb,
             chunk, cfg.gen_batch, " --grad-checkpointing" if checkpointing else "", peak / 2**30)
    return dataclasses.replace(cfg, grad_chunk=chunk, grad_checkpointing=checkpointing)
