"""No host sync in a steady-state tick: counted as ``aten._local_scalar_dense`` calls (what ``.item()``, ``bool(t)``,
``int(t)`` dispatch to) with the counter of ``benchmarks.host_syncs``, over the ticks of a tiny run that generate and
train with no log, evaluation or checkpoint in them. On CPU nothing waits, but the same code on CUDA would."""

from __future__ import annotations

import pytest
import torch

from benchmarks.host_syncs import ScalarReadCounter, count_ticks, steady
from engine.config import parse_config
from engine.outputs import RunOutputs
from engine.run import make_accelerator
from engine.world import build_world

QUIET = ["--images", "40", "--student-steps", "30", "--log-every", "1000", "--eval-every", "1000",
         "--checkpoint-every", "1000", "--checkpoint-minutes", "0"]


@pytest.mark.parametrize("flags", [[], ["--scheduler", "ddpm", "--teacher-logits", "recompute"],
                                   ["--method", "deepinv"], ["--class-focus", "1"]],
                         ids=["default", "ddpm", "deepinv", "class-focus"])
def test_steady_state_ticks_read_nothing_from_the_device(world, tmp_path, flags):
    cfg = parse_config(world.argv(tmp_path / "run", *QUIET, *flags)).resolved()
    built = build_world(cfg, torch.device("cpu"))
    (tmp_path / "run").mkdir()
    ticks = count_ticks(cfg, built, make_accelerator("cpu", "no"), RunOutputs(tmp_path / "run"))
    kept = steady(ticks)
    assert len(kept) >= 10  # L_adv on (after 8 images), CutMix and repair, 1-2 student steps per tick
    assert [t["syncs"] for t in kept] == [0] * len(kept), [t["sites"] for t in kept if t["syncs"]]
    assert ticks[-1]["logged"] and ticks[-1]["syncs"] > 0  # the final log interval does read (the counter works)


def test_the_counter_sees_item_bool_and_int_but_not_host_lists():
    counter = ScalarReadCounter()
    x = torch.arange(3.0)
    with counter:
        x.sum().item(), bool(x[0] > 0), int(x[1])
        x.tolist()
    assert counter.count == 3
