"""What a run shows while it runs and leaves behind besides metrics.jsonl: experiment trackers through accelerate
(``--log-with``), ``curves.png``, the image rate over a window, and the live display on a terminal.

    trackers = tracker_list("tensorboard", run_dir)   # Accelerator(log_with=trackers); validated before any write
    accelerator.init_trackers("diffdfkd", config)     # then RunOutputs.log(line) sends every metrics line
    write_curves(lines, run_dir / "curves.png")       # matplotlib, optional: None (and a warning) without it

TensorBoard events are written by :class:`AtomicTensorBoard`: each log call is one complete event file, made under
a temp name and renamed into ``run_dir/tensorboard/`` (TensorBoard reads every event file of a folder as one run),
so a killed run leaves no half-written record, and TensorBoard can watch the folder live. wandb runs in offline
mode unless ``WANDB_MODE`` says otherwise (``wandb sync run_dir/wandb/offline-run-*`` uploads it later).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import os
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from accelerate.tracking import GeneralTracker, on_main_process

from engine.checkpoints import atomic_path
from engine.errors import UserError

log = logging.getLogger(__name__)

LOG_WITH = {"none": (), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}


# --- trackers ---------------------------------------------------------------------------------------------------
def tracker_list(log_with: str, run_dir: Path) -> list:
    """``--log-with`` -> accelerate's ``log_with``; a tracker whose package is missing is refused by name."""
    trackers = []
    for name in LOG_WITH[log_with]:
        if importlib.util.find_spec(name) is None:
            raise UserError(f"--log-with {log_with} needs the {name} package, which is not installed; "
                            f"pip install 'diffdfkd-engine[{name}]' (or pass --log-with none)")
        if name == "tensorboard":
            trackers.append(AtomicTensorBoard(run_dir / "tensorboard"))
        else:
            os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the machine unless the user asks
            trackers.append(name)
    return trackers


def tracker_init_kwargs(run_dir: Path) -> dict:
    return {"wandb": {"dir": str(run_dir), "name": run_dir.name}}


def tracker_config(config: dict) -> dict:
    """The resolved config as the scalars trackers accept as hyperparameters."""
    return {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in config.items()}


class AtomicTensorBoard(GeneralTracker):
    """accelerate's TensorBoard tracker, but every ``log``/``log_images`` call is one finished event file."""

    name = "tensorboard"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, logging_dir: Path):
        super().__init__()
        self.logging_dir = Path(logging_dir)
        self.count = itertools.count()

    @property
    def tracker(self):
        return self

    @contextlib.contextmanager
    def _event_file(self, step: int | None = None):
        """A SummaryWriter on a temp folder in the run dir; its one event file is renamed into place on close."""
        from torch.utils.tensorboard import SummaryWriter

        self.logging_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tensorboard.", suffix=".tmp", dir=self.logging_dir.parent) as tmp:
            writer = SummaryWriter(tmp)
            yield writer
            writer.close()
            (written,) = Path(tmp).glob("events.out.tfevents.*")
            # Time first, then a counter: file names sort in the order they were written (TensorBoard reads them so);
            # the step lets a resumed run drop what it logs again (prune_event_files).
            name = f"events.out.tfevents.{time.time_ns()}.{next(self.count):06d}.{os.getpid()}.step{step or 0}"
            os.replace(written, self.logging_dir / name)

    @on_main_process  # init_trackers calls it on every process
    def store_init_configuration(self, values: dict) -> None:
        with self._event_file() as writer:
            writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in values.items()))

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        with self._event_file(step) as writer:
            for key, value in values.items():
                writer.add_scalar(key, value, global_step=step)

    @on_main_process
    def log_images(self, values: dict, step: int | None = None, **kwargs) -> None:
        """``values``: name -> an (H, W, C) uint8 array."""
        with self._event_file(step) as writer:
            for key, image in values.items():
                writer.add_image(key, image, global_step=step, dataformats="HWC")


def prune_event_files(logging_dir: Path, student_step: int) -> None:
    """Drop the event files of steps after ``student_step``: a resumed run logs them again (as metrics.jsonl is cut
    back), so each step appears once in TensorBoard."""
    for path in logging_dir.glob("events.out.tfevents.*.step*"):
        if int(path.name.rsplit(".step", 1)[1]) > student_step:
            path.unlink()


def log_images(accelerator, images: dict, step: int) -> None:
    """Images (name -> (H, W, C) uint8) to every tracker that takes them (accelerate has no such call)."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_images({k: [v] for k, v in images.items()}, step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images(images, step=step)


def finish_trackers(accelerator) -> None:
    """``Accelerator.end_training`` without its process-group teardown (the run may still need collectives)."""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            tracker.finish()
    accelerator.trackers = []


# --- image rate -------------------------------------------------------------------------------------------------
class ImageRate:
    """Images made per second over the last ``window_s`` seconds of the run (at least since the previous line).

    The loop counts the images finished between two metrics lines; in a small run whole micro-batches finish only
    every few lines, so that count reads 0 on the lines between. A window of (elapsed, images) pairs does not."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self.points: deque[tuple[float, int]] = deque([(0.0, 0)])  # the run's start (a resumed run: its average)

    def __call__(self, elapsed_s: float, images: int) -> float:
        self.points.append((elapsed_s, images))
        while len(self.points) > 2 and elapsed_s - self.points[1][0] >= self.window_s:
            self.points.popleft()  # the oldest point kept is the newest one at least a window old
        t0, n0 = self.points[0]
        return (images - n0) / (elapsed_s - t0) if elapsed_s > t0 else 0.0


# --- curves.png -------------------------------------------------------------------------------------------------
def write_curves(lines: list[dict], path: Path) -> bool:
    """Student accuracy, the KD terms and the synthesis terms against student steps and against images made.
    Returns False (writing nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [("student accuracy", lambda k: k == "student_acc"), ("student loss (KD)", lambda k: k.startswith("kd_")),
            ("synthesis loss", lambda k: k.startswith("inv_"))]
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 8), squeeze=False, sharex="col")
    for (title, wanted), row in zip(rows, axes):
        keys = sorted({k for line in lines for k in line if wanted(k)})
        for col, x_key in enumerate(("student_step", "images")):
            ax = row[col]
            for key in keys:
                points = [(line[x_key], line[key]) for line in lines if key in line]
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key.split("_", 1)[-1]
                        if key != "student_acc" else "test accuracy")
            ax.set_title(f"{title} vs {x_key.replace('_', ' ')}", fontsize=9)
            ax.grid(alpha=0.3)
            if keys and col == 1:
                ax.legend(fontsize=7, loc="best")
            if not keys:
                ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)
    axes[-1][0].set_xlabel("student steps")
    axes[-1][1].set_xlabel("images made")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.95, hspace=0.3, wspace=0.15)  # not tight_layout: 2x
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def grid_array(grid: torch.Tensor) -> np.ndarray:
    """A (C, H, W) grid in [0, 1] -> (H, W, 3) uint8, for trackers."""
    grid = grid.expand(3, -1, -1) if grid.shape[0] == 1 else grid
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


# --- the live display -------------------------------------------------------------------------------------------
class LiveDisplay:
    """On a terminal: a bar for images made, one for student steps, and a line with the latest accuracy, losses,
    buffer fill and images/s; it moves at every metrics line (``--log-every``) and, while no student step is made
    (offline synthesis), its images bar at every finished micro-batch. Not on a terminal (CI, pipes, files):
    :meth:`create` returns None and the run logs plain lines."""

    def __init__(self, images: int, student_steps: int, console=None):
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.text import Text

        self.console = console or logging_console() or Console(stderr=True)
        self.last_acc: float | None = None  # evaluated every --eval-every steps: shown until the next evaluation
        self.progress = Progress(TextColumn("{task.description:>13}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console)
        self.images = self.progress.add_task("images", total=images)
        self.steps = self.progress.add_task("student steps", total=student_steps)
        self.live = Live(Group(self.progress, Text("waiting for the first metrics line", style="dim")),
                         console=self.console, refresh_per_second=4)

    @classmethod
    def create(cls, images: int, student_steps: int) -> LiveDisplay | None:
        return cls(images, student_steps) if sys.stderr.isatty() else None

    def __enter__(self) -> LiveDisplay:
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.__exit__(*exc)

    def update(self, line: dict) -> None:
        from rich.console import Group
        from rich.text import Text

        self.advance(line["images"])
        self.progress.update(self.steps, completed=line["student_step"])
        self.last_acc = line.get("student_acc", self.last_acc)
        self.live.update(Group(self.progress, Text.assemble(*status_parts(line, self.last_acc))))

    def advance(self, images: int) -> None:
        """The images bar alone, between metrics lines (offline synthesis makes no student step to log)."""
        self.progress.update(self.images, completed=min(images, self.progress.tasks[0].total))


def logging_console():
    """The console of the rich logging handler (engine.logs), if one is set up."""
    from rich.logging import RichHandler

    return next((h.console for h in logging.getLogger().handlers if isinstance(h, RichHandler)), None)


def status_parts(line: dict, acc: float | None) -> list:
    """The live display's status line: (text, style) pieces."""
    parts = []
    if acc is not None:
        parts += [("acc ", "dim"), (f"{acc:.2%}", "bold green"), ("  ", "")]
    for key, label in (("kd_L_kd", "L_kd"), ("kd_kl", "kl"), ("kd_msarc", "msarc"), ("inv_L_inv", "L_inv"),
                       ("inv_bn", "bn"), ("inv_cls", "cls"), ("inv_adv", "adv")):
        if key in line:
            parts += [(f"{label} ", "dim"), (f"{line[key]:.4g}  ", "")]
    parts += [("buffer ", "dim"), (f"{line.get('buffer_fill', 0):.0%}  ", ""),
              (f"{line.get('images_per_s', 0):.3g} img/s", "bold")]
    return parts
