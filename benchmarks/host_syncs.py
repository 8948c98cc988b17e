"""Host syncs per steady-state tick of the co-training loop, counted on CPU.

A host sync is a device scalar read: ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)`` all dispatch to
``aten._local_scalar_dense``, which on CUDA waits for the stream to drain. On CPU nothing waits, but the op is
dispatched all the same, so counting it there finds every site a GPU run would stall on. Optimizer step counters
(``torch/optim``: Adam's ``_get_value(step)``, a CPU tensor, no device sync) are not counted.

A tick is steady when it both generates and trains, and no metrics line, evaluation or checkpoint falls in it
(those are the intervals where the loop is meant to read the device).

    python -m benchmarks.host_syncs            # the default world, 300 images / 300 student steps
    -> {"syncs_per_tick": ..., "steady_ticks": ..., "sites": {"engine/loop.py:123": n, ...}}
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]


class ScalarReadCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` calls, except those made from ``torch/optim`` (step counters); ``sites``
    names the innermost frame of this repository that asked, as ``path:line``."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            stack = traceback.extract_stack()
            if not any("/torch/optim/" in frame.filename for frame in stack):
                self.count += 1
                ours = [f for f in stack if f.filename.startswith(str(REPO)) and "/.venv/" not in f.filename
                        and not f.filename.endswith("host_syncs.py")]
                where = f"{Path(ours[-1].filename).relative_to(REPO)}:{ours[-1].lineno}" if ours else "torch"
                self.sites[where] += 1
        return func(*args, **(kwargs or {}))


def count_ticks(cfg, world, accelerator, outputs) -> list[dict]:
    """Run ``co_train`` once under a :class:`ScalarReadCounter`; per tick: syncs counted, whether it generated,
    trained, logged or checkpointed, and the sites. Tick boundaries are the loop's once-per-tick
    ``max_over_processes`` call (the checkpoint decision that ends every tick)."""
    import engine.loop

    ticks: list[dict] = []
    counter = ScalarReadCounter()
    real = {name: getattr(engine.loop, name) for name in ("max_over_processes", "log_metrics", "student_step")}
    current = {"log": False, "train": False}

    def end_of_tick(accel, values):
        out = real["max_over_processes"](accel, values)
        checkpoint = bool(out[0] or out[1])
        ticks.append({"syncs": counter.count, "sites": dict(counter.sites), "trained": current["train"],
                      "logged": current["log"] or checkpoint, "generating": bool(generating())})
        # A checkpoint is written after this call: its reads land in the next tick's count, which is then not steady.
        counter.count, current["log"], current["train"] = 0, checkpoint, False
        counter.sites.clear()
        return out

    def log_metrics(*args, **kwargs):
        current["log"] = True
        return real["log_metrics"](*args, **kwargs)

    def student_step(*args, **kwargs):
        current["train"] = True
        return real["student_step"](*args, **kwargs)

    def generating() -> bool:  # the loop's own stop condition is internal: judge from the buffer's fill
        return outputs_buffer["buffer"] is not None and outputs_buffer["buffer"].total_added < cfg.images

    outputs_buffer = {"buffer": None}
    real_init = engine.loop.ReplayBuffer.__init__

    def buffer_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        outputs_buffer["buffer"] = self

    engine.loop.max_over_processes = end_of_tick
    engine.loop.log_metrics = log_metrics
    engine.loop.student_step = student_step
    engine.loop.ReplayBuffer.__init__ = buffer_init
    try:
        with counter:
            engine.loop.co_train(cfg, world, accelerator, outputs)
    finally:
        for name, value in real.items():
            setattr(engine.loop, name, value)
        engine.loop.ReplayBuffer.__init__ = real_init
    return ticks


def steady(ticks: list[dict]) -> list[dict]:
    """Ticks that generate and train, with no log, evaluation or checkpoint in them."""
    return [t for t in ticks if t["trained"] and t["generating"] and not t["logged"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run-dir", default="/tmp/host_syncs_run")
    parser.add_argument("extra", nargs="*", help="more engine.run flags (after --)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from engine.config import parse_config
    from engine.outputs import RunOutputs
    from engine.run import make_accelerator
    from engine.world import build_world

    flags = ["--run-dir", args.run_dir, "--device", "cpu", "--images", str(args.images),
             "--student-steps", str(args.student_steps), "--log-every", "100", "--eval-every", "100000",
             "--checkpoint-every", "100000", "--checkpoint-minutes", "0", *args.extra]
    cfg = parse_config(flags).resolved()
    world = build_world(cfg, torch.device("cpu"))
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    ticks = count_ticks(cfg, world, make_accelerator("cpu", "no"), RunOutputs(Path(args.run_dir)))
    kept = steady(ticks)
    sites: collections.Counter[str] = collections.Counter()
    for tick in kept:
        sites.update(tick["sites"])
    result = {"syncs_per_tick": sum(t["syncs"] for t in kept) / max(1, len(kept)),
              "max_syncs_in_a_tick": max((t["syncs"] for t in kept), default=0), "steady_ticks": len(kept),
              "ticks": len(ticks), "sites": dict(sites.most_common(20))}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
