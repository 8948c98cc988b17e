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
    with streams.on("train"):
        for _ in range(20):  # a queue of writes on the train stream
            student.weight.data.add_(1.0)
        streams.record("trained", "train")
    with streams.on("gen"):
        streams.wait("gen", "trained")
        copy_weights(snapshot, student)
        streams.record("snapshotted", "gen")
    streams.join()
    torch.testing.assert_close(snapshot.weight, student.weight)


def test_online_run_with_streams_on_cuda(world, tmp_path):
    from engine.run import main

    code, out, err = run_main(main, [*world.argv(tmp_path / "run"), "--device", "cuda"])
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["student_steps"] == 8 and summary["images"] == 16
