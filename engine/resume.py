"""What ``--resume`` may change: a resumed run must be the run its ``config.json`` describes.

Everything that decides what the run computes (budget, seeds, models, losses, optimizer, sampler) must match the
saved config, or the run would become a mixture of two. The fields below only say how long it runs, how often it
reports, or where and how fast it computes, and may differ.
"""

from __future__ import annotations

import dataclasses
import json

from engine.config import ONLINE_SCHEDULE_FIELDS, VALUE_BEFORE_THE_FIELD, RunConfig, reads_online_schedule
from engine.errors import UserError

RESUME_SAFE = frozenset({
    "student_steps",  # may grow, to extend a run (finished or not); the cosine schedule stretches to the new total
    "log_every", "eval_every", "checkpoint_every", "checkpoint_minutes", "export", "log_with",  # reporting
    "guidance_grid",  # and outputs
    "device", "use_streams", "grad_checkpointing", "channels_last", "compile",  # where and how it computes, not what
    "run_dir", "resume", "overwrite", "dry_run", "argv",  # how this start was asked for (the folder may have moved)
})


def flag_name(field: str) -> str:
    flags = {f.name: f.metadata.get("flag") for f in dataclasses.fields(RunConfig)}
    return flags.get(field) or "--" + field.replace("_", "-")


def check_same_run(saved: dict, new: dict) -> None:
    """Refuse (one line naming every differing flag) unless ``new`` continues the run that ``saved`` describes.
    Both are resolved configs as written to config.json; a field only ``new`` has (an older engine saved the run)
    is compared with what that engine did (``VALUE_BEFORE_THE_FIELD``) where that is known, else skipped; the
    online schedule's fields are not compared for a run that never reads them (offline, real-data KD)."""
    new = json.loads(json.dumps(new))  # compare as JSON sees them (tuples are lists)
    saved = {k: v for k, v in VALUE_BEFORE_THE_FIELD.items() if k in new} | saved
    unread = set() if reads_online_schedule(new) else ONLINE_SCHEDULE_FIELDS
    changed = [f"{flag_name(k)} {saved[k]} (now {new[k]})" for k in saved.keys() & new.keys()
               if k not in RESUME_SAFE | unread and saved[k] != new[k]]
    if new.get("student_steps", 0) < saved.get("student_steps", 0):
        changed.append(f"--student-steps {saved['student_steps']} (now {new['student_steps']}; it may only grow)")
    if changed:
        raise UserError(f"--resume: the run in {new['run_dir']} was started with {', '.join(sorted(changed))}; "
                        "pass the same flags or start anew with --overwrite (see README, Running)")
