"""What every benchmark records beside its numbers, and how it writes them.

    results = {"guided": {...}, ...} | run_metadata("benchmarks.guidance", argv)
    write_results(results, RESULTS_DIR / "guidance.json")

``run_metadata`` gives ``command`` (the exact command line), ``commit`` (``git rev-parse HEAD``, with ``-dirty`` when
the working tree has uncommitted changes to tracked files), ``machine`` (platform, CPU count, torch version, GPU) and
``date`` (UTC, ISO 8601). Results are written atomically, so a benchmark killed mid-write leaves the previous file.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.checkpoints import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"


def git_commit() -> str:
    """HEAD's hash (+ ``-dirty`` when tracked files differ from it); ``unknown`` outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def machine() -> str:
    """E.g. ``Linux-6.1-x86_64 | 2 CPUs | torch 2.x | cuda: NVIDIA H100``."""
    parts = [platform.platform(), f"{os.cpu_count()} CPUs", f"{torch.get_num_threads()} torch threads",
             f"torch {torch.__version__}", f"python {platform.python_version()}"]
    if torch.cuda.is_available():
        parts.append(f"cuda: {torch.cuda.get_device_name()}")
    return " | ".join(parts)


def run_metadata(module: str, argv: list[str] | None = None) -> dict[str, str]:
    args = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join(["python -m", module, shlex.join(args)]).rstrip(),  # quoted: it can be pasted back
        "commit": git_commit(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(results: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write_json(results, path)
    return path


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(device: torch.device | str, into: dict, key: str = "seconds") -> Iterator[None]:
    """``with timed(device, stats): ...`` stores the wall time of the block, bracketed by device syncs."""
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        into[key] = into.get(key, 0.0) + time.perf_counter() - start
