"""``python -m benchmarks.memory``: peak memory of ONE guided step of a default-world micro-batch (the committed
digits prior, the MNIST teacher, the default student for L_adv, the RunConfig defaults) in four settings:

    whole batch          grad_chunk 0
    grad_chunk 10        forward + backward on 10 samples at a time
    grad_checkpointing   the prior's UNet recomputes its activations in the backward pass
    both                 grad_chunk 10 and grad_checkpointing

Each setting runs in a fresh subprocess (``--setting NAME`` is that child), so no setting inherits another's
allocations. What is measured, around ``GuidedSampler.step`` on the first timestep with L_adv on:

    CPU   process RSS, not an allocator figure: peak RSS after the step (getrusage ru_maxrss) minus the current RSS
          after the world was built, just before the step (/proc/self/statm). The first step in a process also pays
          one-off costs (kernel and allocator set-up), the same in every setting; if the step did not raise the
          process's peak (``step_raised_peak`` false), the figure is only an upper bound.
    CUDA  torch.cuda.max_memory_allocated during the step minus torch.cuda.memory_allocated before it.

Time: ``first_step_ms`` (the measured step) and ``ms_per_step`` (the mean of ``--repeats`` further steps of the same
micro-batch). Writes ``benchmarks/results/memory.json``.

    OMP_NUM_THREADS=1 python -m benchmarks.memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from benchmarks.common import RESULTS_DIR, run_metadata, synchronize, write_results

SETTINGS = {
    "whole batch": {"grad_chunk": 0, "grad_checkpointing": False},
    "grad_chunk 10": {"grad_chunk": 10, "grad_checkpointing": False},
    "grad_checkpointing": {"grad_chunk": 0, "grad_checkpointing": True},
    "both": {"grad_chunk": 10, "grad_checkpointing": True},
}
MB = 2**20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--gen-batch", type=int, default=50, help="images in the micro-batch")
    parser.add_argument("--repeats", type=int, default=2, help="further steps timed after the measured one")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", default=RESULTS_DIR / "memory.json")
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)  # the child process
    return parser


def current_rss() -> int:
    """Resident set size now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The process's peak resident set size so far, in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(setting: str, args) -> dict:
    """One setting, in this (fresh) process: build the world, then measure one guided step."""
    from engine.config import RunConfig
    from engine.datasets import dataset_info
    from engine.loop import micro_batch
    from engine.synthesize import resolve_device
    from engine.world import guided_sampler, load_teacher
    from models.registry import build_classifier

    device = resolve_device(args.device)
    cfg = RunConfig(gen_batch=args.gen_batch, guide_every=1, **SETTINGS[setting])  # every timed step guided
    info = dataset_info(cfg.dataset)
    teacher, view = load_teacher(cfg, info, device)
    sampler = guided_sampler(cfg, info, teacher, view, device)
    sampler.set_weights(adv=cfg.adv)  # as after the warm-up: the heaviest step
    student = build_classifier(cfg.student, info.num_classes, info.channels).to(device).eval().requires_grad_(False)
    batch = sampler.start(*micro_batch(cfg, 0, info.num_classes))
    cuda = device.type == "cuda"
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before, peak_before = torch.cuda.memory_allocated(device), None
    else:
        before, peak_before = current_rss(), peak_rss()
    start = time.perf_counter()
    sampler.step(batch, student)
    synchronize(device)
    first_ms = (time.perf_counter() - start) * 1000
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
    start = time.perf_counter()
    for _ in range(args.repeats):
        sampler.step(batch, student)
    synchronize(device)
    result = {**SETTINGS[setting], "step_peak_mb": round((peak - before) / MB, 1), "before_mb": round(before / MB, 1),
              "peak_mb": round(peak / MB, 1), "first_step_ms": round(first_ms, 1),
              "ms_per_step": round((time.perf_counter() - start) * 1000 / max(args.repeats, 1), 1),
              "loss": sampler.weighted.formula(), "device": str(device), "threads": torch.get_num_threads()}
    if not cuda:
        result["step_raised_peak"] = peak > peak_before
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.setting:  # the child: one setting, one JSON line on stdout
        print(json.dumps(measure(args.setting, args)))
        return 0
    settings = {}
    for name in SETTINGS:
        child = [sys.executable, "-m", "benchmarks.memory", "--setting", name, "--gen-batch", str(args.gen_batch),
                 "--repeats", str(args.repeats), "--device", args.device]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            return done.returncode
        settings[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:20s} step peak {settings[name]['step_peak_mb']:8.1f} MB  "
              f"{settings[name]['ms_per_step']:8.1f} ms/step", flush=True)
    first = next(iter(settings.values()))
    measured = ("torch.cuda.max_memory_allocated during the step minus memory_allocated before it"
                if first["device"].startswith("cuda") else
                "process RSS, not an allocator figure: peak RSS (ru_maxrss) after the step minus the current RSS "
                "after building the world, before the step; fresh process per setting")
    results = {"gen_batch": args.gen_batch, "device": first["device"], "threads": first["threads"],
               "loss": first["loss"], "step": "GuidedSampler.step on the first timestep (guided, ε̂ recomputed)",
               "step_peak_mb": measured, "settings": settings}
    write_results(results | run_metadata("benchmarks.memory", argv), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
