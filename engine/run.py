"""``python -m engine.run``: co-train a student from a teacher and a diffusion prior, data-free.

The defaults run the embedded offline world (an MNIST teacher, a DDPM prior trained only on scikit-learn's
digits) on a CPU. See ``python -m engine.run --help`` for every flag and ``--dry-run`` for the resolved config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path

import torch

from engine.config import parse_config
from engine.errors import UserError, exits_cleanly
from engine.logs import setup_logging

log = logging.getLogger("engine.run")


def make_accelerator(device: str, mixed_precision: str, log_with: list | None = None):
    """The Accelerator for --device, --mixed-precision and --log-with; what accelerate would silently replace is
    refused (CUDA where there is none, fp16 autocast on the CPU)."""
    from accelerate import Accelerator

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu (or auto)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if cpu and mixed_precision == "fp16":
        raise UserError("--mixed-precision fp16 needs CUDA and this run is on the CPU; use bf16 or no")
    if mixed_precision == "auto":
        mixed_precision = "no" if cpu else "bf16"
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=log_with or None)


def load_resume_checkpoint(cfg, world, outputs, resolved: dict, processes: int) -> dict | None:
    """--resume: the checkpoint, validated against this start (config, student, processes), or None when the run
    died before its first one (it starts from scratch). Reads only: a rejected --resume changes nothing."""
    from engine.resume import check_same_run

    saved = outputs.dir / "config.json"
    if saved.exists():
        try:
            check_same_run(json.loads(saved.read_text()), resolved)
        except json.JSONDecodeError:
            raise UserError(f"cannot read {saved}: it is corrupt; start anew with --overwrite") from None
    if not outputs.has_checkpoint():
        log.info("--resume: %s has no checkpoint yet: the run starts from scratch", outputs.dir)
        return None
    checkpoint = outputs.load_checkpoint(processes)
    try:
        world.student.load_state_dict(checkpoint["student"])  # the loop loads it again, into the same module
    except RuntimeError as err:
        raise UserError(f"--resume: the checkpoint's student does not fit --student {cfg.student} "
                        f"({str(err).splitlines()[0]}); pass the run's student or start anew with --overwrite"
                        ) from None
    return checkpoint


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv).resolved()
    if cfg.dry_run:
        print(cfg.to_json())
        return 0
    setup_logging()
    from engine.loop import co_train
    from engine.memory import fit_memory_target
    from engine.outputs import RunOutputs, check_run_dir, prepare_run_dir
    from engine.stopping import Stopped, stop_on_signals
    from engine.tracking import LiveDisplay, tracker_list
    from engine.world import build_world

    run_dir = Path(cfg.run_dir)
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision, tracker_list(cfg.log_with, run_dir))
    is_main = accelerator.is_main_process
    if not is_main:  # one voice: the other ranks report only problems
        logging.getLogger().setLevel(logging.WARNING)
    # Everything is validated before the run dir is touched, on every rank (reads only: all fail alike or none does).
    check_run_dir(run_dir, cfg.resume, cfg.overwrite)
    world = build_world(cfg, accelerator.device)
    cfg = fit_memory_target(cfg, world, accelerator)  # CUDA: measured --grad-chunk, recorded in config.json
    outputs = RunOutputs(run_dir, is_main=is_main)
    resolved = dataclasses.asdict(cfg) | {"argv": sys.argv[1:] if argv is None else argv,
                                          "device": str(accelerator.device),
                                          "teacher_checkpoint": world.teacher.checkpoint,
                                          "teacher_arch": world.teacher.arch}
    checkpoint = None
    if cfg.resume:
        checkpoint = load_resume_checkpoint(cfg, world, outputs, resolved, accelerator.num_processes)
    # The new run is known to start: only now is an old run replaced (--overwrite); the main process locks the dir.
    with prepare_run_dir(run_dir, cfg.resume, cfg.overwrite) if is_main else contextlib.nullcontext():
        accelerator.wait_for_everyone()
        if cfg.resume:
            outputs.truncate_metrics(checkpoint["state"]["student_step"] if checkpoint else 0)
        outputs.write_config(resolved)
        log.info("run dir %s on %s", run_dir, accelerator.device)
        outputs.start_tracking(accelerator, resolved)
        live = LiveDisplay.create(cfg.images, cfg.student_steps) if is_main else None
        outputs.display = live
        try:
            with stop_on_signals() as stop, live or contextlib.nullcontext():
                summary = co_train(cfg, world, accelerator, outputs, checkpoint, stop)
                if is_main and cfg.method == "diffdfkd" and cfg.guidance_grid:  # the same seeds, guided or not
                    outputs.write_guidance_grid(world.generator, world.student, world.info.num_classes, cfg.seed,
                                                accelerator, cfg.gen_batch, cfg.images)
        except Stopped as stopped:
            return stopped.exit_code
        except KeyboardInterrupt:  # a second Ctrl-C: at once, without a traceback; checkpoints are written atomically
            log.warning("interrupted at once: the last checkpoint written stays, --resume continues from it")
            return 128 + signal.SIGINT
        finally:
            outputs.finish_tracking()
    if is_main:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
