"""CUDA-only checks (skipped without a GPU; CI has none): the two-stream run and its weight hand-off."""

import json

import pytest
import torch

from tests.conftest import run_main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_stream_pair_orders_the_snapshot_after_training_on_cuda():
    from engine.streams import StreamPair, copy_weights

    device = torch.device("cuda")
    streams = StreamPair(device, enabled=True)
    student = torch.nn.Linear(256, 256).to(device)
    snapshot = torch.nn.Linear(256, 256).to(device)
    streams.begin()
    with streams.on("train"):  # tick n−1: a queue of writes, then the snapshot for tick n
        for _ in range(20):
            student.weight.data.add_(1.0)
        copy_weights(snapshot, student)
        streams.record("snapshotted", "train")
    with streams.on("gen"):  # tick n: the generator reads the snapshot only after it was written
        streams.wait("gen", "snapshotted")
        seen = snapshot.weight.detach().clone()
        streams.record("generated", "gen")
    streams.join()
    torch.testing.assert_close(seen, student.weight)


def test_online_run_with_streams_on_cuda(world, tmp_path, capsys):
    from engine.run import main

    code, out, err = run_main(main, [*world.argv(tmp_path / "run"), "--device", "cuda"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["student_steps"] == 8 and summary["images"] == 16


def test_steady_state_ticks_do_not_sync_on_cuda(world, tmp_path):
    """tests/test_host_syncs.py on the GPU: no device scalar read in a steady-state tick with CUDA tensors either
    (``benchmarks.throughput --sync-debug`` shows CUDA's own sync warnings for a whole run)."""
    from benchmarks.host_syncs import count_ticks, steady
    from engine.config import parse_config
    from engine.outputs import RunOutputs
    from engine.run import make_accelerator
    from engine.world import build_world
    from tests.test_host_syncs import QUIET

    cfg = parse_config(world.argv(tmp_path / "run", *QUIET, "--device", "cuda")).resolved()
    built = build_world(cfg, torch.device("cuda"))
    (tmp_path / "run").mkdir()
    ticks = count_ticks(cfg, built, make_accelerator("cuda", "no"), RunOutputs(tmp_path / "run"))
    kept = steady(ticks)
    assert len(kept) >= 10 and [t["syncs"] for t in kept] == [0] * len(kept), [t["sites"] for t in kept]


def test_memory_target_picks_the_largest_chunk_that_fits_on_cuda(world, tmp_path):
    import dataclasses

    from engine.config import parse_config
    from engine.errors import UserError
    from engine.memory import fit_memory_target, guided_step_peak
    from engine.run import make_accelerator
    from engine.world import build_world

    accelerator = make_accelerator("cuda", "no")
    cfg = parse_config(world.argv(tmp_path / "run", "--device", "cuda", "--gen-batch", "64")).resolved()
    built = build_world(cfg, accelerator.device)
    sampler, student = built.generator, built.student.eval()
    labels, seeds = torch.arange(64) % 10, torch.arange(64)
    sampler.set_weights(adv=cfg.adv)  # as the calibration measures: L_adv on
    peaks = {}
    for chunk in (0, 8):
        sampler.config.grad_chunk = chunk
        peaks[chunk] = guided_step_peak(sampler, labels, seeds, student, accelerator.device)
    sampler.config.grad_chunk = 0
    sampler.set_weights(adv=0.0)
    assert peaks[8] < peaks[0]
    target_gb = (peaks[8] + peaks[0]) / 2 / 2**30
    fitted = fit_memory_target(dataclasses.replace(cfg, memory_target_gb=target_gb), built, accelerator)
    assert 8 <= fitted.grad_chunk < 64 and not fitted.grad_checkpointing
    assert sampler.config.grad_chunk == fitted.grad_chunk and sampler.config.adv == 0.0
    with pytest.raises(UserError, match="--memory-target-gb 1e-06: .* raise the target"):
        fit_memory_target(dataclasses.replace(cfg, memory_target_gb=1e-6), built, accelerator)
    assert sampler.config.grad_chunk == fitted.grad_chunk  # a failed fit leaves the sampler as it was
