"""Run the engine from a benchmark exactly as a user would (``python -m engine.run ...`` in a subprocess), keep
each run directory so every number traces back to its config.json and metrics.jsonl, and aggregate seeds.

Every finished run also gets a ``record.json`` (the commit that ran it, its command line, date, machine). A table
too long for one sitting is built over several: point ``--runs`` at a folder under ``benchmarks/results/records/``
(whose small files, config/summary/record/metrics, are committed; .gitignore keeps the weights out) and pass
``--reuse``; each row then lists the commits its runs came from, so a table assembled from runs of different
commits says so."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import RESULTS_DIR, run_metadata
from engine.checkpoints import atomic_write_json
from engine.config import (
    GUIDED_STEP_FIELDS,
    ONLINE_SCHEDULE_FIELDS,
    PRIOR_SAMPLER_FIELDS,
    VALUE_BEFORE_THE_FIELD,
    WORLDS,
    RunConfig,
    parse_config,
    reads_online_schedule,
)
from engine.resume import RESUME_SAFE, flag_name


def budget_parser(doc: str, *, images: int, student_steps: int, runs: str | None, out: Path | None
                  ) -> argparse.ArgumentParser:
    """The flags every accuracy benchmark shares: seeds, the image and student-step budget, where runs go (``None``:
    set by :func:`world_paths` after parsing)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--student-steps", type=int, default=student_steps)
    parser.add_argument("--runs", type=Path, default=Path(runs) if runs else None,
                        help="one run directory per engine run")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs under --runs")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--jobs", type=int, default=1,
                        help="engine runs at once; each gets cpu_count/jobs torch threads (CPU machines)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="flags passed to every engine run (last on the command line)")
    return parser


def add_world_flag(parser: argparse.ArgumentParser) -> None:
    """``--world``: the embedded world every engine run of the benchmark uses (``engine.run --world``)."""
    parser.add_argument("--world", choices=list(WORLDS), default="digits",
                        help="embedded world (teacher, prior, dataset, student); results go to *_WORLD.json")


def world_paths(args, name: str) -> None:
    """Fill ``--runs`` and ``--out`` unless given: runs/bench-NAME and RESULTS_DIR/NAME.json in the digits world,
    runs/bench-NAME-WORLD and NAME_WORLD.json in any other (a world's runs are never reused for another's)."""
    suffix = "" if args.world == "digits" else f"_{args.world}"
    args.runs = args.runs or Path(f"runs/bench-{name.replace('_', '-')}{suffix.replace('_', '-')}")
    args.out = args.out or RESULTS_DIR / f"{name}{suffix}.json"


def budget_flags(args) -> list[str]:
    """The engine flags of the shared budget (``--extra`` included; ``--world`` unless digits, the default)."""
    world = getattr(args, "world", "digits")
    return [*(["--world", world] if world != "digits" else []),
            "--images", str(args.images), "--student-steps", str(args.student_steps), *args.extra]


def budget_record(args) -> dict:
    return {"images": args.images, "student_steps": args.student_steps, "extra_flags": args.extra,
            "world": getattr(args, "world", "digits")}


def check_reusable(flags: list[str], run_dir: Path) -> None:
    """Refuse to reuse a finished run that is not the run ``flags`` ask for (another budget, seed or objective): its
    saved config.json is compared with what the flags resolve to now, except the fields that only say how a run
    reports or where it computes (``engine.resume.RESUME_SAFE``; the budget counts), for DeepInversion and real-data
    KD the guided prior sampler's settings they never read, for DM-KD the guided step's, and for offline runs and
    real-data KD the online schedule's (``--kd-tail``). A field the run predates must hold its default, the behaviour
    the engine had before it (or, where the default has changed since, ``VALUE_BEFORE_THE_FIELD``). Runs without
    config.json are not checked."""
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    wanted = json.loads(parse_config(["--run-dir", str(run_dir), *flags]).resolved().to_json())
    defaults = json.loads(RunConfig().to_json()) | VALUE_BEFORE_THE_FIELD
    skip = (RESUME_SAFE - {"student_steps"}) | {"teacher_arch", "teacher_checkpoint"}  # the last two: the world's
    if wanted["method"] in ("deepinv", "real-kd"):  # e.g. a DeepInversion run from before α's default changed
        skip |= PRIOR_SAMPLER_FIELDS
    if wanted["method"] == "dmkd":  # e.g. a DM-KD run from before the fashion world's η changed
        skip |= GUIDED_STEP_FIELDS
    if not reads_online_schedule(wanted):  # e.g. an offline run reused in a table made with the tail
        skip |= ONLINE_SCHEDULE_FIELDS
    changed = [f"{flag_name(k)} {saved[k] if k in saved else defaults[k]} (now {v})" for k, v in wanted.items()
               if k not in skip and v != saved.get(k, defaults[k])]
    if changed:
        raise SystemExit(f"--reuse: {run_dir} was run with {', '.join(sorted(changed))}; delete that run directory "
                         "or give it another --runs folder")


def run_engine(name: str, flags: list[str], run_dir: Path, reuse: bool = False, threads: int = 0) -> dict:
    """The run's summary.json (student_acc, best_student_acc, wall_seconds, images, ...) with its ``record``
    (commit, command, date, machine: ``record.json``, written once the run has finished). ``reuse``: a finished
    run is read back instead of run again, after :func:`check_reusable`."""
    summary, record = run_dir / "summary.json", run_dir / "record.json"
    if reuse and summary.exists():
        check_reusable(flags, run_dir)
    else:
        flags = ["--no-guidance-grid", *flags]  # a benchmark reads summary.json; the grid would add ~40 s a run
        command = [sys.executable, "-m", "engine.run", "--run-dir", str(run_dir), "--overwrite", *flags]
        env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
        print(f"[{time.strftime('%H:%M:%S')}] {name}: python {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        atomic_write_json(run_metadata("engine.run", ["--run-dir", str(run_dir), "--overwrite", *flags])
                          | {"threads": threads or None}, record)
    saved = json.loads(record.read_text()) if record.exists() else {"commit": "unknown (run before record.json)"}
    return json.loads(summary.read_text()) | {"record": saved}


def run_engines(runs: list[tuple[str, list[str], Path]], reuse: bool = False, jobs: int = 1) -> list[dict]:
    """Several engine runs, ``jobs`` at a time; summaries in the order given. With jobs > 1 each run gets an equal
    share of the CPU threads: on a 2-core machine two 1-thread runs finish sooner than two 2-thread runs in turn."""
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda run: run_engine(*run, reuse=reuse, threads=threads), runs))


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def seed_rows(runs: list[dict], seeds: list[int]) -> dict:
    """Per-seed last/best accuracies and their mean ± std (last-step accuracy is the headline)."""
    last = [r["student_acc"] for r in runs]
    row = {"seeds": seeds, "last": last, "last_mean_std": mean_std(last)}
    if runs and "best_student_acc" in runs[0]:
        row["best"] = [r["best_student_acc"] for r in runs]
        row["best_mean_std"] = mean_std(row["best"])
        row["wall_seconds"] = [r.get("wall_seconds") for r in runs]
    commits = sorted({r["record"]["commit"] for r in runs if "record" in r})
    if commits:  # more than one: the row was assembled over several sittings (see the module docstring)
        row["commits"] = commits
    return row


def run_variants(args, variants: dict[str, list[str]], names: list[str], images: dict[str, int] | None = None
                 ) -> dict:
    """Each named variant (engine flags) over ``args.seeds`` at the shared budget, ``args.jobs`` runs at a time;
    per variant its seed rows, flags and, where the runs report it, the replay exposure (mean draws of the oldest
    and newest tenth of the images, averaged over seeds). ``images``: a variant's own image count instead of the
    budget's (equal compute). Prints one line per variant."""
    budget = budget_flags(args)
    own = {name: ["--images", str(images[name])] if images else [] for name in names}
    jobs = [(name, [*variants[name], "--seed", str(s), *budget, *own[name]], args.runs / f"{name}-s{s}")
            for name in names for s in args.seeds]
    summaries = iter(run_engines(jobs, args.reuse, args.jobs))
    rows = {}
    for name in names:
        runs = [next(summaries) for _ in args.seeds]
        rows[name] = seed_rows(runs, args.seeds) | {"flags": variants[name]}
        exposures = [r["replay_exposure"]["mean_draws_by_arrival"] for r in runs if r.get("replay_exposure")]
        if exposures:
            rows[name]["draws_oldest_tenth"] = statistics.fmean(e[0] for e in exposures)
            rows[name]["draws_newest_tenth"] = statistics.fmean(e[-1] for e in exposures)
        m = rows[name]["last_mean_std"]
        print(f"{name:22s} {100 * m['mean']:6.2f} ± {100 * m['std']:.2f}", flush=True)
    return rows
