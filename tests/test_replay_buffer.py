"""The replay buffer: a uint8 tensor ring of finished images with teacher logits, soft targets and seeds."""

from __future__ import annotations

import pytest
import torch

from engine.replay_buffer import ReplayBuffer

SHAPE = (1, 4, 4)
K = 3


def batch(first: int, n: int):
    """``n`` entries whose every field encodes its index, so order and overwrites are visible."""
    ids = torch.arange(first, first + n)
    images = (ids.float() / 255).view(n, 1, 1, 1).expand(n, *SHAPE).clone()
    logits = ids.float().view(n, 1).repeat(1, K)
    targets = torch.nn.functional.one_hot(ids % K, K).float()
    return images, logits, targets, ids


def test_add_stores_uint8_images_and_counts():
    buffer = ReplayBuffer(8, SHAPE, K)
    assert len(buffer) == 0 and buffer.images.dtype == torch.uint8
    buffer.add(*batch(0, 3))
    assert len(buffer) == 3 and buffer.total_added == 3 and buffer.cursor == 3
    images, logits, targets, seeds = buffer.contents()
    assert torch.equal(seeds, torch.arange(3)) and torch.equal(logits[:, 0], torch.arange(3.0))
    assert torch.allclose(images[:, 0, 0, 0], torch.arange(3) / 255)  # exact on the uint8 grid
    assert targets.argmax(1).tolist() == [0, 1, 2]


def test_images_are_clamped_and_quantised():
    buffer = ReplayBuffer(2, SHAPE, K)
    images = torch.tensor([-0.5, 1.7]).view(2, 1, 1, 1).expand(2, *SHAPE)
    buffer.add(images, torch.zeros(2, K), torch.zeros(2, K), torch.arange(2))
    assert buffer.contents()[0][:, 0, 0, 0].tolist() == [0.0, 1.0]
    buffer.add(torch.full((1, *SHAPE), 0.5), torch.zeros(1, K), torch.zeros(1, K), torch.arange(1))
    assert abs(buffer.contents()[0][-1, 0, 0, 0].item() - 0.5) <= 0.5 / 255 + 1e-6  # nearest uint8 level


def test_sample_draws_from_the_filled_part_only():
    buffer = ReplayBuffer(100, SHAPE, K)
    with pytest.raises(RuntimeError, match="empty"):
        buffer.sample(4)
    buffer.add(*batch(0, 5))
    images, logits, targets = buffer.sample(64, torch.Generator().manual_seed(0))
    assert images.shape == (64, *SHAPE) and images.dtype == torch.float32
    assert logits.shape == (64, K) and targets.shape == (64, K)
    assert set(logits[:, 0].long().tolist()) <= set(range(5))
    # images, logits and targets of one draw belong to the same entry
    assert torch.equal((images[:, 0, 0, 0] * 255).round().long(), logits[:, 0].long())
    again = buffer.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(again[1], logits)  # seeded: reproducible


def test_ring_overwrites_the_oldest_and_contents_are_oldest_first():
    buffer = ReplayBuffer(5, SHAPE, K)
    buffer.add(*batch(0, 3))
    buffer.add(*batch(3, 4))  # wraps: slots 3, 4, 0, 1
    assert len(buffer) == 5 and buffer.total_added == 7 and buffer.cursor == 2
    assert buffer.contents()[3].tolist() == [2, 3, 4, 5, 6]
    buffer.add(*batch(7, 1))
    images, logits, targets, seeds = buffer.contents()
    assert seeds.tolist() == [3, 4, 5, 6, 7]
    assert logits[:, 0].tolist() == [3, 4, 5, 6, 7] and targets.argmax(1).tolist() == [0, 1, 2, 0, 1]
    assert torch.equal((images[:, 0, 0, 0] * 255).round().long(), seeds)


@pytest.mark.parametrize("added", [3, 5, 12])  # partly filled, exactly full, wrapped
def test_state_dict_round_trip(added):
    buffer = ReplayBuffer(5, SHAPE, K)
    for first in range(0, added, 2):
        buffer.add(*batch(first, min(2, added - first)))
    buffer.sample(7, torch.Generator().manual_seed(added))  # some draw counts to carry over
    state = buffer.state_dict()
    assert all(v.device.type == "cpu" for v in state.values() if isinstance(v, torch.Tensor))
    restored = ReplayBuffer(5, SHAPE, K)
    restored.load_state_dict(state)
    assert (len(restored), restored.cursor, restored.total_added) == (len(buffer), buffer.cursor, buffer.total_added)
    for mine, theirs in zip(buffer.contents(), restored.contents()):
        assert torch.equal(mine, theirs)
    assert restored.exposure() == buffer.exposure() and buffer.exposure()["mean"] > 0
    buffer.add(*batch(100, 2))  # and both continue identically
    restored.add(*batch(100, 2))
    for mine, theirs in zip(buffer.contents(), restored.contents()):
        assert torch.equal(mine, theirs)


def test_sample_is_uniform_over_every_stored_entry():
    """Draws are uniform over the filled slots (not the newest entry, not a fixed few): the same indices as
    ``torch.randint`` under the same generator, and over many draws every entry about equally often."""
    buffer = ReplayBuffer(16, SHAPE, K)
    buffer.add(*batch(0, 10))
    _, logits, _ = buffer.sample(4000, torch.Generator().manual_seed(3))
    expected = torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(logits[:, 0].long(), expected)
    counts = torch.bincount(logits[:, 0].long(), minlength=10)
    assert counts.min() > 300 and counts.max() < 500  # 400 each in expectation (binomial sd ≈ 19)


def test_every_draw_is_counted_and_a_new_entry_starts_at_zero():
    buffer = ReplayBuffer(4, SHAPE, K)
    buffer.add(*batch(0, 4))
    _, logits, _ = buffer.sample(50, torch.Generator().manual_seed(0))
    assert torch.equal(buffer.draws, torch.bincount(logits[:, 0].long(), minlength=4))
    before = buffer.draws.clone()
    buffer.add(*batch(4, 1))  # overwrites slot 0 (the oldest entry)
    assert buffer.draws[0] == 0 and torch.equal(buffer.draws[1:], before[1:])


def test_balanced_draws_follow_one_plus_draws_to_the_minus_p():
    """Slots drawn 0, 1 and 3 times so far, exponent 1: probabilities (1, 1/2, 1/4) / 1.75 = 4/7, 2/7, 1/7 within
    one batch."""
    buffer = ReplayBuffer(3, SHAPE, K)
    buffer.add(*batch(0, 3))
    buffer.draws.copy_(torch.tensor([0, 1, 3]))
    _, logits, _ = buffer.sample(70_000, torch.Generator().manual_seed(1), balance=1.0)
    share = torch.bincount(logits[:, 0].long(), minlength=3).double() / 70_000
    assert torch.allclose(share, torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64), atol=0.006)  # sd ≈ 0.002


def test_balanced_draws_even_out_the_exposure_of_a_growing_buffer():
    """Ten entries, then ten more: uniform draws leave the first ten with far more draws (30 vs 10 in expectation);
    the larger the exponent, the more even."""
    spread = {}
    for balance in (0.0, 1.0, 8.0):
        buffer, generator = ReplayBuffer(20, SHAPE, K), torch.Generator().manual_seed(2)
        buffer.add(*batch(0, 10))
        for _ in range(20):
            buffer.sample(10, generator, balance=balance)
        buffer.add(*batch(10, 10))
        for _ in range(20):
            buffer.sample(10, generator, balance=balance)
        groups = buffer.exposure(parts=2)["mean_draws_by_arrival"]
        spread[balance] = groups[0] - groups[1]
    assert spread[0.0] > 15 and spread[0.0] > spread[1.0] + 5 > spread[8.0] + 5 and abs(spread[8.0]) < 3


def test_exposure_is_reported_oldest_first():
    buffer = ReplayBuffer(4, SHAPE, K)
    buffer.add(*batch(0, 4))
    buffer.draws.copy_(torch.tensor([1, 2, 3, 6]))
    buffer.add(*batch(4, 2))  # slots 0, 1 now hold the newest entries, drawn 0 times
    assert buffer.exposure(parts=2) == {"mean_draws_by_arrival": [4.5, 0.0], "min": 0, "mean": 2.25, "max": 6}
