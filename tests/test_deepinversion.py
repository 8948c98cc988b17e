"""DeepInversion (Yin et al. 2020) as the engine runs it: the published recipe's loss, jitter, flips, cosine lr, and
flags that reach it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import parse_config
from engine.deepinversion import DeepInversionConfig, DeepInversionGenerator, image_prior_losses
from engine.sampler import TeacherView
from engine.world import build_world
from losses import BNStatHooks
from models.registry import build_classifier


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_classifier("convnet-w8", 3, 1).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def view():
    return TeacherView(8, 1, (0.5,), (0.25,))


class Spy(torch.nn.Module):
    """The teacher, recording every input it is given."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.inputs = teacher, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.teacher(x)


def test_image_priors_against_hand_computed_values():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # right (−1, −2), down (−2, −3), anti-diagonal (2 − 1), diagonal (0 − 4)
    tv1, tv2 = image_prior_losses(x)
    assert float(tv1) == pytest.approx(1.5 + 2.5 + 1 + 4)
    assert float(tv2) == pytest.approx(math.sqrt(5) + math.sqrt(13) + 1 + 4)


def test_one_step_minimises_the_published_objective(teacher, view):
    cfg = DeepInversionConfig(bn=2.0, cls=0.5, tv_l1=0.3, tv_l2=0.01, l2=0.02, first_bn_multiplier=10.0, jitter=0,
                              steps=4, lr=0.05)
    gen = DeepInversionGenerator(teacher, view, 3, cfg)
    batch = gen.start(torch.tensor([0, 1, 2, 0]), torch.arange(4))
    pixels = batch.pixels.detach().clone().requires_grad_(True)
    x = view.normalize(pixels)
    with BNStatHooks(teacher, first_multiplier=10.0) as hooks:
        logits = teacher(x)
        bn = hooks.loss()
    tv1, tv2 = image_prior_losses(x)
    expected = (2.0 * bn + 0.5 * F.cross_entropy(logits, batch.labels) + 0.3 * tv1 + 0.01 * tv2
                + 0.02 * x.flatten(1).norm(dim=1).mean())
    expected.backward()
    adam = torch.optim.Adam([pixels], lr=0.05, betas=(0.5, 0.9), eps=1e-8)
    adam.step()
    gen.step(batch)
    assert float(batch.last_terms["L_inv"]) == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(batch.pixels.detach(), pixels.detach().clamp(0, 1))


def test_start_is_the_teachers_mean_plus_std_noise(teacher, view):
    batch = DeepInversionGenerator(teacher, view, 3, DeepInversionConfig()).start(torch.tensor([0]), torch.tensor([5]))
    noise = torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(batch.pixels.detach()[0], (0.5 + 0.25 * noise).clamp(0, 1))


@pytest.mark.parametrize("flip", [False, True])
def test_jitter_rolls_and_flip_mirrors_what_the_teacher_sees(teacher, view, flip):
    spy = Spy(teacher)
    gen = DeepInversionGenerator(spy, view, 3, DeepInversionConfig(jitter=2, flip=flip, steps=12, lr=0.0))
    batch = gen.start(torch.tensor([0, 1]), torch.arange(2))
    x = view.normalize(batch.pixels.detach())  # lr 0: the pixels never move, only the view of them does
    seen = []
    for _ in range(12):
        gen.step(batch)
        candidates = {(dy, dx, f): torch.roll(x, (dy, dx), (2, 3)).flip(3) if f else torch.roll(x, (dy, dx), (2, 3))
                      for dy in range(-2, 3) for dx in range(-2, 3) for f in (False, True)}
        matches = [key for key, view_ in candidates.items() if torch.equal(view_, spy.inputs[-1])]
        assert matches, "the teacher saw something other than a roll (and flip) of the pixels"
        seen.append(matches[0])
    assert any(dy or dx for dy, dx, _ in seen)  # it does jitter
    assert any(f for *_, f in seen) == flip  # flips only when asked, and then some of the time
    assert not flip or not all(f for *_, f in seen)


def test_cosine_learning_rate_over_the_batch(teacher, view):
    gen = DeepInversionGenerator(teacher, view, 3, DeepInversionConfig(steps=4, lr=0.2))
    batch = gen.start(torch.tensor([0]), torch.tensor([1]))
    rates = []
    for _ in range(4):
        gen.step(batch)
        rates.append(batch.optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])


def test_a_batch_restored_from_its_state_continues_exactly(teacher, view):
    gen = DeepInversionGenerator(teacher, view, 3, DeepInversionConfig(jitter=2, flip=True, steps=6))
    batch = gen.start(torch.tensor([0, 1, 2]), torch.arange(3))
    for _ in range(3):
        gen.step(batch)
    saved = gen.batch_state(batch)
    restored = gen.restore_batch(saved)
    for _ in range(3):
        gen.step(batch)
        gen.step(restored)
    assert restored.done and torch.equal(restored.pixels, batch.pixels)


def test_flags_reach_the_generator(world):
    cfg = parse_config(world.argv("unused", "--method", "deepinv", "--deepinv-bn", "3", "--deepinv-cls", "0.5",
                                  "--deepinv-tv-l2", "0.002", "--deepinv-jitter", "1")).resolved()
    generator = build_world(cfg, torch.device("cpu")).generator
    assert isinstance(generator, DeepInversionGenerator)
    c = generator.config
    assert (c.bn, c.cls, c.tv_l2, c.jitter, c.first_bn_multiplier) == (3.0, 0.5, 0.002, 1, 10.0)
    off = parse_config(world.argv("unused", "--method", "deepinv", "--no-bn")).resolved()
    assert build_world(off, torch.device("cpu")).generator.config.bn == 0.0
