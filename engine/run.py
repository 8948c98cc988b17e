"""``python -m engine.run``: co-train a student from a teacher and a diffusion prior, data-free.

The defaults run the embedded offline world (an MNIST teacher, a DDPM prior trained only on scikit-learn's
digits) on a CPU. See ``python -m engine.run --help`` for every flag and ``--dry-run`` for the resolved config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from engine.config import parse_config
from engine.errors import exits_cleanly
from engine.logs import setup_logging

log = logging.getLogger("engine.run")


def make_accelerator(device: str, mixed_precision: str):
    from accelerate import Accelerator

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if mixed_precision == "auto":
        mixed_precision = "no" if cpu else "bf16"
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv).resolved()
    if cfg.dry_run:
        print(cfg.to_json())
        return 0
    setup_logging()
    from engine.loop import co_train
    from engine.memory import fit_memory_target
    from engine.outputs import RunOutputs, check_run_dir, live_display, prepare_run_dir
    from engine.world import build_world

    accelerator = make_accelerator(cfg.device, cfg.mixed_precision)
    if not accelerator.is_main_process:  # one voice: the other ranks report only problems
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir, cfg.resume, cfg.overwrite)  # read-only, on every rank: all fail alike or none does
    world = build_world(cfg, accelerator.device)  # all user errors surface here, before any output is written
    cfg = fit_memory_target(cfg, world, accelerator)  # CUDA: measured --grad-chunk, recorded in config.json
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, cfg.resume, cfg.overwrite)  # only now is an old run replaced (--overwrite)
    accelerator.wait_for_everyone()
    live, update = live_display() if accelerator.is_main_process else (None, None)
    outputs = RunOutputs(run_dir, is_main=accelerator.is_main_process, live=update)
    resolved = dataclasses.asdict(cfg) | {"argv": sys.argv[1:] if argv is None else argv,
                                          "device": str(accelerator.device),
                                          "teacher_checkpoint": world.teacher.checkpoint,
                                          "teacher_arch": world.teacher.arch}
    outputs.write_config(resolved)
    log.info("run dir %s on %s", run_dir, accelerator.device)
    if live is not None:
        with live:
            summary = co_train(cfg, world, accelerator, outputs)
    else:
        summary = co_train(cfg, world, accelerator, outputs)
    if accelerator.is_main_process:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
