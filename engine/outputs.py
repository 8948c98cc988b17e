"""The run directory (SPEC §6): config.json, metrics.jsonl, student.safetensors (+ .json), samples.png,
curves.png, guided_vs_unguided.png (diffdfkd), checkpoint.pt, tensorboard/ (``--log-with``), and the optional
synthetic ImageFolder export. Every file is written atomically; only the main process writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import functools
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.checkpoints import (
    DiskFull,
    atomic_dir,
    atomic_path,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    reporting_disk_full,
)
from engine.errors import UserError
from engine.replay_buffer import ReplayBuffer
from engine.tracking import (
    ImageRate,
    finish_trackers,
    grid_array,
    log_images,
    prune_event_files,
    tracker_config,
    tracker_init_kwargs,
    write_curves,
)

log = logging.getLogger(__name__)


LOCK = ".lock"  # run_dir/.lock: holds the PID of the process running there, locked while it runs


def holds_a_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir())


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a previous run unless asked, or a folder that cannot be made; writes nothing, so it runs
    before the (possibly slow) world is built and a bad flag leaves the disk untouched."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file; pass a folder")
    if holds_a_run(run_dir):
        if resume and not (run_dir / "checkpoint.pt").exists() and not (run_dir / "config.json").exists():
            raise UserError(f"--resume: {run_dir} has no checkpoint.pt to resume from (nor a config.json: it holds "
                            "no run of this engine); pass another --run-dir")
        if not resume and not overwrite:
            raise UserError(f"{run_dir} already holds a run; pass --resume to continue it "
                            "or --overwrite to replace it")
    elif resume:
        raise UserError(f"--resume: {run_dir} holds no run; drop --resume to start a new run")
    ancestor = run_dir.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot create run directory {run_dir} ({ancestor} is not a writable folder); "
                        "pass a writable --run-dir")


@contextlib.contextmanager
def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Iterator[None]:
    """Once the new run is known to start (everything validated): create the folder, lock it for this process until
    the block ends, clear the old run (--overwrite) and drop the temp files of a killed run. Main process only.

    The lock is ``flock`` on ``run_dir/.lock``: the kernel releases it when the process ends, however it ends, so a
    lock left by a dead process is never in force; --overwrite keeps that file, so the folder stays locked while the
    old run is deleted."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK, "a+")
    except OSError as err:
        raise UserError(f"cannot write to run directory {run_dir} ({err.strerror}); "
                        "pass a writable --run-dir") from None
    with lock:  # closing it releases the lock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = (lock.read().split() or ["?"])[-1]
            raise UserError(f"{run_dir} is in use by another run (process {holder}); wait for it to end "
                            "or pass another --run-dir") from None
        except OSError as err:  # ENOLCK, EOPNOTSUPP: a filesystem without locks (some NFS mounts); run unguarded
            log.warning(
                "cannot lock %s (%s): nothing stops a second run from writing to this folder at the same time",
                run_dir, err.strerror)
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        check_run_dir(run_dir, resume, overwrite)  # again, under the lock: another process may have run here since
        try:
            if overwrite:
                for old in run_dir.iterdir():
                    if old.name != LOCK:
                        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
            probe = run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise UserError(f"cannot write to run directory {run_dir} ({err.strerror}); "
                            "pass a writable --run-dir") from None
        for stale in run_dir.glob(".*.tmp"):  # temp files of a killed run: never under a final name, safe to drop
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        yield


CHECKPOINT_KEYS = {"student", "optimizer", "schedule", "state", "ranks"}


class RunOutputs:
    def __init__(self, run_dir: str | os.PathLike, is_main: bool = True, display=None):
        self.dir = Path(run_dir)
        self.is_main = is_main
        self.display = display  # the terminal's LiveDisplay (engine.tracking), or None: plain log lines
        self.reported_tenths = 0  # synthesis_progress: tenths of the images already reported in plain lines
        self.accelerator = None  # set by start_tracking when --log-with names trackers
        self.buffer: ReplayBuffer | None = None  # the loop's replay buffer (watch): sample grids at every eval
        self.image_rate = ImageRate()

    # --- trackers -------------------------------------------------------------------------------------------------
    def start_tracking(self, accelerator, config: dict) -> None:
        """accelerate's ``init_trackers`` for the trackers the Accelerator was made with (``--log-with``)."""
        if accelerator.log_with:
            accelerator.init_trackers("diffdfkd", tracker_config(config), tracker_init_kwargs(self.dir))
            self.accelerator = accelerator

    def finish_tracking(self) -> None:
        if self.accelerator is not None:
            finish_trackers(self.accelerator)
            self.accelerator = None

    def watch(self, buffer: ReplayBuffer) -> None:
        self.buffer = buffer

    # --- config and metrics ---------------------------------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        if self.is_main:
            atomic_write_json(config, self.dir / "config.json")

    def truncate_metrics(self, student_step: int) -> None:
        """Keep the lines up to ``student_step`` (a resumed run logs the later steps again), and drop a partial last
        line of a killed write; atomically."""
        path = self.dir / "metrics.jsonl"
        if not self.is_main or not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["student_step"] <= student_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
        atomic_write_text("".join(kept), path)
        prune_event_files(self.dir / "tensorboard", student_step)

    def log(self, line: dict) -> None:
        if not self.is_main:
            return
        if "elapsed_s" in line:
            line["images_per_s"] = self.image_rate(line["elapsed_s"], line["images"])
        path = self.dir / "metrics.jsonl"
        with reporting_disk_full(path), open(path, "a") as f:  # append-only: a partial last line is the worst case
            f.write(json.dumps(line) + "\n")
        if self.accelerator is not None:
            step = line["student_step"]
            self.accelerator.log({k: v for k, v in line.items() if isinstance(v, (int, float))}, step=step)
            if "student_acc" in line and self.buffer is not None and len(self.buffer):  # every evaluation
                num_classes = self.buffer.targets.shape[1]
                images, targets = newest_images(self.buffer, 40 * num_classes)  # ~40 a class: full rows of 10
                grid = class_grid(images, targets.argmax(1), num_classes)
                log_images(self.accelerator, {"samples": grid_array(grid)}, step)
        if self.display is not None:
            self.display.update(line)
        else:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in line.items()
                     if k in ("student_step", "images", "images_per_s", "kd_L_kd", "inv_L_inv", "student_acc")}
            log.info(" ".join(f"{k}={v}" for k, v in shown.items()))

    def synthesis_progress(self, images: int, total: int) -> None:
        """Images made while no metrics line is due (offline synthesis, a warming buffer): host counters only. The
        terminal display moves its images bar; plain logs get a line at every tenth of the images."""
        if not self.is_main:
            return
        if self.display is not None:
            self.display.advance(images)
            return
        tenths = 10 * images // max(total, 1)
        if tenths > self.reported_tenths:
            self.reported_tenths = tenths
            log.info("images made: %d/%d (no student step yet)", images, total)

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def has_checkpoint(self) -> bool:
        return (self.dir / "checkpoint.pt").exists()

    def save_checkpoint(self, accelerator, student, optimizer, schedule, buffer, state, rng,
                        batch_generator_state, in_flight: list) -> None:
        """One file for the whole run: the (DDP-synchronised) student and optimizer, and every rank's replay buffer,
        RNG state and in-flight micro-batches, gathered to the main process (a collective: every rank calls it)."""
        shard = {"buffer": buffer.state_dict(), "rng": rng, "batch_generator": batch_generator_state,
                 "in_flight": in_flight}
        shards = gather_to_all(accelerator, shard)
        if not self.is_main:
            return
        checkpoint = {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                      "schedule": schedule.state_dict(), "state": vars(state).copy(), "ranks": shards}
        try:
            atomic_torch_save(checkpoint, self.dir / "checkpoint.pt")
        except DiskFull:  # the previous checkpoint.pt is untouched (atomic write)
            raise DiskFull(f"no space left on {self.dir} (needs about {tensor_bytes(checkpoint) / 2**20:.0f} MB per "
                           "checkpoint); free some space, then --resume from the last checkpoint") from None

    def load_checkpoint(self, ranks: int = 1) -> dict:
        path = self.dir / "checkpoint.pt"
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise UserError(f"cannot read {path} ({type(err).__name__}); it is corrupt: "
                            "start anew with --overwrite") from None
        missing = CHECKPOINT_KEYS - set(ckpt) if isinstance(ckpt, dict) else CHECKPOINT_KEYS
        if missing:
            raise UserError(f"{path} is not a checkpoint of this engine (no {', '.join(sorted(missing))}); "
                            "start anew with --overwrite")
        if len(ckpt["ranks"]) != ranks:
            n = len(ckpt["ranks"])
            raise UserError(f"{path} was written by {n} processes; resume it with as many: "
                            f"accelerate launch --num_processes {n} or torchrun --nproc_per_node {n}")
        return ckpt

    # --- final outputs --------------------------------------------------------------------------------------------
    def write_final(self, accelerator, student, buffer, info, summary: dict, arch: str = "", mean=(), std=(),
                    export: bool = False) -> None:
        # Every rank's buffer, export or not: samples.png shows all of them (one gather at the end of the run).
        shards = gather_to_all(accelerator, buffer.state_dict())
        if not self.is_main:
            return
        if len(shards) > 1:  # the samples grid and the export show every rank's images
            buffer = ReplayBuffer.from_state_dicts(shards, info.num_classes)
        atomic_save_safetensors(student.state_dict(), self.dir / "student.safetensors")
        sidecar = {"arch": arch, "class_names": list(info.class_names), "mean": list(mean), "std": list(std),
                   "in_channels": buffer.images.shape[1], "image_size": buffer.images.shape[-1],
                   "test_accuracy": summary["student_acc"], "best_test_accuracy": summary["best_student_acc"]}
        atomic_write_json(sidecar, self.dir / "student.json")
        images, _, targets, seeds = buffer.contents()
        if len(images):
            save_grid(class_grid(images, targets.argmax(1), info.num_classes), self.dir / "samples.png")
        self.write_curves()
        if export:
            export_image_folder(buffer, info.class_names, self.dir / "synthetic")
        atomic_write_json(summary, self.dir / "summary.json")

    def write_curves(self) -> None:
        """curves.png from metrics.jsonl (the whole run, resumed parts included); without matplotlib, one warning."""
        path = self.dir / "metrics.jsonl"
        lines = []
        for text in path.read_text().splitlines() if path.exists() else []:
            with contextlib.suppress(ValueError):  # a partial last line of a killed write
                lines.append(json.loads(text))
        if lines and not write_curves(lines, self.dir / "curves.png"):
            log.warning("matplotlib is not installed: no curves.png (pip install 'diffdfkd-engine[plots]'); "
                        "the other outputs are written")

    def write_guidance_grid(self, generator, student, num_classes: int, seed: int, accelerator, batch_size: int,
                            budget: int, max_per_class: int = 4, max_classes: int = 10) -> None:
        """guided_vs_unguided.png: for the same seeds, the prior alone (left: no teacher guidance, no CutMix) and
        the run's guided sampler with the final student (right); one row per class (the first ``max_classes``),
        never more images a side than the run's image ``budget``."""
        classes = min(num_classes, max_classes)
        per_class = max(1, min(max_per_class, budget // classes))
        labels = torch.arange(classes).repeat_interleave(per_class)
        seeds = seed * 10_000_000 + torch.arange(len(labels))  # the seeds of the run's first images
        plain = copy.copy(generator)  # the same prior and teacher; its own config and loss weights
        plain.config = dataclasses.replace(generator.config, cutmix_every=0, repair_steps=0)
        plain.set_weights(bn=0.0, cls=0.0, adv=0.0)
        student = copy.deepcopy(student).eval().requires_grad_(False)
        made = {"unguided": [], "guided": []}
        with accelerator.autocast():
            for i in range(0, len(labels), batch_size):
                part = slice(i, i + batch_size)
                made["unguided"].append(plain.sample(labels[part], seeds[part])[0].float().cpu())
                made["guided"].append(generator.sample(labels[part], seeds[part], student)[0].float().cpu())
        unguided, guided = (torch.cat(made[k]).view(classes, per_class, *made[k][0].shape[1:]) for k in made)
        gap = torch.ones(classes, 1, *guided.shape[2:])  # a white column between the two halves
        rows = torch.cat([unguided, gap, guided], dim=1)  # (classes, 2·per_class + 1, C, H, W)
        save_grid(make_grid(rows.flatten(0, 1), nrow=2 * per_class + 1), self.dir / "guided_vs_unguided.png")


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list (about the size of its ``torch.save`` file)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def max_over_processes(accelerator, values: list[int]) -> list[int]:
    """Each value's maximum over the processes, so that every process takes the same branch (a collective, on the
    host: it never waits for the GPU)."""
    if accelerator.num_processes == 1:
        return values
    reduced = torch.tensor(values, dtype=torch.int64)
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX, group=host_group())
    return reduced.tolist()


@functools.cache
def host_group():
    """A gloo group of every process (the default group when it is gloo), made on the first call, which every
    process reaches together."""
    dist = torch.distributed
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def gather_to_all(accelerator, obj) -> list:
    """``obj`` of every process, in rank order (a collective; a one-element list on a single process)."""
    if accelerator.num_processes == 1:
        return [obj]
    gathered = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def newest_images(buffer: ReplayBuffer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` newest images (float, [0, 1]) and targets, newest first: a small gather, not the whole buffer."""
    slots = (buffer.cursor - 1 - torch.arange(min(n, len(buffer)))) % buffer.capacity
    slots = slots.to(buffer.images.device)
    return buffer.images[slots].float() / 255, buffer.targets[slots]


def class_grid(images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int = 10) -> torch.Tensor:
    """One row per class that has images, as many columns as every such class fills (at most ``per_class``): the
    first images of each class, no empty cells. Upscaled to at least 56 px a cell. (C, H', W') in [0, 1]."""
    picked = [images[labels == k][:per_class].cpu() for k in range(num_classes)]
    picked = [p for p in picked if len(p)]
    columns = min(len(p) for p in picked)
    return make_grid(torch.cat([p[:columns] for p in picked]), nrow=columns)


def save_class_grid(images: torch.Tensor, labels: torch.Tensor, num_classes: int, path: Path,
                    per_class: int = 10) -> None:
    save_grid(class_grid(images, labels, num_classes, per_class), path)


def make_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    from torchvision.utils import make_grid as torchvision_grid

    upscale = max(1, -(-56 // images.shape[-1]))  # small images (28 px digits) doubled, 64 px and more as they are
    if upscale > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=upscale, mode="nearest")
    return torchvision_grid(images, nrow=nrow, padding=2)


def save_grid(grid: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")


def export_image_folder(buffer, class_names, out: Path) -> None:
    """The synthetic set as ``out/<class>/<index>.png`` + ``labels.pt`` (targets, teacher logits, seeds)."""
    from torchvision.utils import save_image

    images, logits, targets, seeds = buffer.contents()
    hard = targets.argmax(1)
    with atomic_dir(out) as tmp:
        for name in class_names:
            (tmp / name.replace("/", "_")).mkdir()
        files = []
        for i in range(len(images)):
            rel = f"{class_names[int(hard[i])].replace('/', '_')}/{i:06d}.png"
            save_image(images[i].cpu(), tmp / rel, format="png")
            files.append(rel)
        torch.save({"files": files, "targets": targets.cpu(), "teacher_logits": logits.cpu(), "seeds": seeds.cpu(),
                    "class_names": list(class_names)}, tmp / "labels.pt")
