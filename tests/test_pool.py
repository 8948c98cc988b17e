"""The generation pool (engine/synthesis/pool.py): every in-flight sample in one latent tensor, one tick at a time.

Parity: unguided, the pool is the plain diffusers DDIM/DDPM loop, also when micro-batches at different step
indices share a tick; guided, each micro-batch moves as the guided sampler moves it alone (its own L_bn statistics);
with one micro-batch and the sampler's generator, CutMix and seam repair match the sampler draw for draw.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from engine.synthesis import DiffusionPool, GenerationPool, make_pool
from engine.synthesis.pool import step_tables
from models.priors import load_prior
from tests.test_sampler import CLASSES, cfg_eps, initial_noise, make_sampler, pixel_folder, teacher, view  # noqa: F401


@pytest.fixture(scope="module", params=["ddim", "ddpm"])
def prior(request, pixel_folder):  # noqa: F811
    return load_prior(pixel_folder, CLASSES, scheduler=request.param)


def step_noise(seed: int, step: int, shape=(1, 8, 8)) -> torch.Tensor:
    """DDPM's fresh noise for sample ``seed`` at step index ``step``, the same in the pool and the reference."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1000 + step))


def run_pool(pool: DiffusionPool, starts: dict[int, tuple[torch.Tensor, torch.Tensor]], student=None) -> list:
    """Admit micro-batch ``starts[tick]`` at each listed tick; tick until everything finished."""
    finished, tick = [], 0
    while tick <= max(starts) or pool.in_flight:
        if tick in starts:
            pool.admit(*starts[tick])
        finished += pool.tick(student)
        tick += 1
    return finished


def diffusers_loop(folder, kind: str, labels, seeds: list[int], steps: int, scale: float, monkeypatch) -> torch.Tensor:
    """The final latent of the plain diffusers loop (CFG as the pipelines write it)."""
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = (DDIMScheduler if kind == "ddim" else DDPMScheduler).from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    z, step = initial_noise(seeds), [0]
    monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor",
                        lambda shape, **_: torch.stack([step_noise(s, step[0]) for s in seeds]))
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            step[0] = i
            z = scheduler.step(cfg_eps(unet, z, t, labels, scale), t, z).prev_sample
    return z


def test_unguided_pool_is_the_diffusers_loop_with_micro_batches_at_different_steps(pixel_folder, prior, teacher,  # noqa: F811
                                                                                  view, monkeypatch):  # noqa: F811
    kind = type(prior.scheduler).__name__[:4].lower()
    steps, scale = 5, 2.0
    sampler = make_sampler(prior, teacher, view, bn=0.0, cls=0.0, adv=0.0, steps=steps, guidance_scale=scale)
    pool = DiffusionPool(sampler, torch.Generator().manual_seed(0))
    monkeypatch.setattr(pool, "_noise", lambda shape: torch.stack(
        [step_noise(int(s), int(i)) for s, i in zip(pool.seeds, pool.step)]))
    a = (torch.tensor([0, 1, 2]), torch.tensor([11, 12, 13]))
    b = (torch.tensor([2, 0]), torch.tensor([21, 22]))
    finished = run_pool(pool, {0: a, 2: b})  # b runs 2 steps behind a: 3 ticks share both
    assert [f.seeds.tolist() for f in finished] == [[11, 12, 13], [21, 22]]
    for done, (labels, seeds) in zip(finished, (a, b)):
        z = diffusers_loop(pixel_folder, kind, labels, seeds.tolist(), steps, scale, monkeypatch)
        images = ((z + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(done.images, images, atol=1e-5, rtol=0)
        torch.testing.assert_close(done.logits, teacher((images - 0.5) / 0.5), atol=1e-4, rtol=0)
    assert int(pool.take_skipped()) == 0 and len(pool) == 0


def test_each_guided_micro_batch_moves_as_the_sampler_moves_it_alone(prior, teacher, view):  # noqa: F811
    """L_bn of a micro-batch uses its own batch statistics, even though the pool runs every sample in flight
    through one teacher forward (one statistic over the whole pool would be a different objective)."""
    if not isinstance(prior.scheduler, DDIMScheduler):
        pytest.skip("deterministic sampler: DDPM's noise is drawn differently by the two")
    config = dict(bn=0.5, cls=10.0, steps=4, cutmix_every=0, first_bn_multiplier=2.0)
    a = (torch.tensor([0, 1, 2, 0]), torch.tensor([31, 32, 33, 34]))
    b = (torch.tensor([1, 1, 2]), torch.tensor([41, 42, 43]))
    pool = DiffusionPool(make_sampler(prior, teacher, view, **config), torch.Generator().manual_seed(0))
    finished = run_pool(pool, {0: a, 1: b})
    for done, (labels, seeds) in zip(finished, (a, b)):
        alone, _, _ = make_sampler(prior, teacher, view, **config).sample(labels, seeds)
        torch.testing.assert_close(done.images, alone, atol=1e-5, rtol=0)


def test_the_guidance_ramp_acts_per_micro_batch_step_as_in_the_sampler(prior, teacher, view):  # noqa: F811
    """Two micro-batches one step apart share each tick: each is guided with η at its own step index."""
    if not isinstance(prior.scheduler, DDIMScheduler):
        pytest.skip("deterministic sampler: DDPM's noise is drawn differently by the two")
    config = dict(bn=0.5, cls=10.0, steps=4, cutmix_every=0, guidance_ramp=0.8)
    a = (torch.tensor([0, 1, 2]), torch.tensor([51, 52, 53]))
    b = (torch.tensor([2, 1]), torch.tensor([61, 62]))
    pool = DiffusionPool(make_sampler(prior, teacher, view, **config), torch.Generator().manual_seed(0))
    finished = run_pool(pool, {0: a, 1: b})
    for done, (labels, seeds) in zip(finished, (a, b)):
        alone, _, _ = make_sampler(prior, teacher, view, **config).sample(labels, seeds)
        torch.testing.assert_close(done.images, alone, atol=1e-5, rtol=0)
        flat, _, _ = make_sampler(prior, teacher, view, **(config | {"guidance_ramp": 0.0})).sample(labels, seeds)
        assert (done.images - flat).abs().max() > 1e-3  # the ramp changed the images


def test_one_micro_batch_with_cutmix_and_repair_matches_the_sampler(prior, teacher, view):  # noqa: F811
    """With the sampler's own generator the pool draws the same CutMix boxes; repair and soft labels follow."""
    if not isinstance(prior.scheduler, DDIMScheduler):
        pytest.skip("the sampler draws DDPM noise and CutMix from one generator, the pool in another order")
    config = dict(bn=0.1, cls=10.0, steps=6, cutmix_every=2, repair_steps=2, repair_band=1)
    labels, seeds = torch.tensor([0, 1, 2, 0]), torch.tensor([100, 101, 102, 103])
    images, _, batch = make_sampler(prior, teacher, view, **config).sample(labels, seeds)
    pool = DiffusionPool(make_sampler(prior, teacher, view, **config),
                         torch.Generator().manual_seed(100 * 1_000_003 + 17))  # GuidedSampler.start's generator
    (done,) = run_pool(pool, {0: (labels, seeds)})
    assert not torch.equal(done.label_weights, torch.nn.functional.one_hot(labels, 3).float())  # CutMix did mix
    torch.testing.assert_close(done.label_weights, batch.label_weights)
    torch.testing.assert_close(done.images, images, atol=1e-5, rtol=0)


def test_one_batched_prior_call_per_tick_whatever_is_in_flight(prior, teacher, view):  # noqa: F811
    calls = []
    handle = prior.unet.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    try:
        pool = DiffusionPool(make_sampler(prior, teacher, view, steps=4), torch.Generator().manual_seed(0))
        for n in (3, 2, 4):
            pool.admit(torch.arange(n) % 3, torch.arange(n) + 10 * n)
            calls.clear()
            pool.tick()
            # a guided forward (with grad) and the ε̂ recompute, each over every sample in flight, both CFG branches
            assert calls == [2 * len(pool)] * 2
    finally:
        handle.remove()


def test_guidance_terms_are_averaged_over_the_samples_each_guided_step_moved(prior, teacher, view):  # noqa: F811
    """The metrics read each term's mean over the window's guided samples: a step over 4 samples and one over 7
    weigh 4 : 7; a term only part of the window has (L_adv after its warm-up) averages over the samples it saw."""
    pool = DiffusionPool(make_sampler(prior, teacher, view, bn=0.5, cls=10.0, steps=4),
                         torch.Generator().manual_seed(0))
    pool.admit(torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 3, 4]))
    pool.tick()
    first = dict(pool.last_terms())
    pool.admit(torch.tensor([1, 1, 2]), torch.tensor([5, 6, 7]))
    pool.tick()
    second = pool.last_terms()
    window = pool.take_terms()
    assert set(window) == set(first) >= {"bn", "cls", "L_inv"} and pool.take_terms() == {}  # read once
    for name in first:
        torch.testing.assert_close(window[name], (4 * first[name] + 7 * second[name]) / 11)
    pool.record_terms({"bn": torch.tensor(2.0)}, 1)
    pool.record_terms({"bn": torch.tensor(5.0), "adv": torch.tensor(3.0)}, 2)
    pool.record_terms({"bn": torch.tensor(float("nan")), "adv": torch.tensor(1.0)}, 2)  # a skipped step's NaN
    assert pool.take_terms() == {"bn": torch.tensor(4.0), "adv": torch.tensor(2.0)}


def test_checkpointed_pool_continues_bit_identically(prior, teacher, view):  # noqa: F811
    config = dict(bn=0.1, cls=10.0, steps=6, cutmix_every=2, repair_steps=2, repair_band=1)
    starts = {0: (torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])), 2: (torch.tensor([2, 2]), torch.tensor([4, 5]))}
    whole = run_pool(DiffusionPool(make_sampler(prior, teacher, view, **config), torch.Generator().manual_seed(7)),
                     starts)
    pool = DiffusionPool(make_sampler(prior, teacher, view, **config), torch.Generator().manual_seed(7))
    for tick in range(4):  # mid-repair of the first micro-batch (CutMix after step index 1, two repair steps)
        if tick in starts:
            pool.admit(*starts[tick])
        assert not pool.tick()
    saved = pool.state_dict()
    window = pool.take_terms()  # the metrics window in flight is kept too
    pool.tick()  # the live pool moves on; the saved copy must not
    resumed = DiffusionPool(make_sampler(prior, teacher, view, **config), torch.Generator().manual_seed(123))
    resumed.load_state_dict(saved)
    assert resumed.take_terms() == window
    finished = []
    while resumed.in_flight:
        finished += resumed.tick()
    assert len(finished) == len(whole) == 2
    for a, b in zip(finished, whole):
        assert torch.equal(a.images, b.images) and torch.equal(a.label_weights, b.label_weights)


def test_both_generators_implement_the_protocol(prior, teacher, view):  # noqa: F811
    from engine.synthesis.deepinversion import DeepInversionConfig, DeepInversionGenerator

    rng = torch.Generator().manual_seed(0)
    assert isinstance(make_pool(make_sampler(prior, teacher, view), rng), GenerationPool)
    inversion = DeepInversionGenerator(teacher, view, 3, DeepInversionConfig(steps=2))
    assert isinstance(make_pool(inversion, rng), GenerationPool)


def test_schedulers_the_pool_does_not_step_are_refused(pixel_folder):  # noqa: F811
    other = load_prior(pixel_folder, CLASSES, scheduler="dpm")
    with pytest.raises(ValueError, match="DDIM or DDPM"):
        step_tables(other.scheduler, 4, "cpu")


def test_a_run_with_a_scheduler_the_pool_does_not_step_fails_in_one_line(world, tmp_path, capsys):
    from engine.run import main
    from tests.conftest import run_main

    code, _, err = run_main(main, world.argv(tmp_path / "run", "--scheduler", "dpm"), capsys)
    assert code == 2 and "DDIM or DDPM" in err and "Traceback" not in err


def test_micro_batch_guided_passes_give_the_pool_pass_result_in_smaller_graphs(prior, teacher, view):  # noqa: F811
    """``guided_pass="micro-batch"`` runs the guided forward + backward and the ε̂ recompute once per micro-batch
    (the CPU default): the same objective (each micro-batch has its own L_bn) as one pass over the pool, so the
    same images."""
    config = dict(bn=0.5, cls=10.0, steps=4, cutmix_every=0)
    a = (torch.tensor([0, 1, 2, 0]), torch.tensor([31, 32, 33, 34]))
    b = (torch.tensor([1, 1, 2]), torch.tensor([41, 42, 43]))
    calls = []
    handle = prior.unet.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    try:
        results = {}
        for guided_pass in ("pool", "micro-batch"):
            pool = DiffusionPool(make_sampler(prior, teacher, view, guided_pass=guided_pass, **config),
                                 torch.Generator().manual_seed(0))
            pool.admit(*a)
            pool.tick()
            pool.admit(*b)
            calls.clear()
            pool.tick()  # both micro-batches in flight, both guided
            # guided forward(s), then the ε̂ recompute, over all 7 samples or per micro-batch (CFG doubles each)
            assert calls == ([14, 14] if guided_pass == "pool" else [8, 6, 8, 6]), guided_pass
            finished = []
            while pool.in_flight:
                finished += pool.tick()
            results[guided_pass] = [done.images for done in finished]
    finally:
        handle.remove()
    for pooled, per_batch in zip(*results.values()):
        torch.testing.assert_close(per_batch, pooled, atol=1e-5, rtol=0)


def test_auto_guided_pass_is_one_pool_pass_on_cuda_and_per_micro_batch_elsewhere():
    from engine.config import RunConfig
    from engine.world import guidance_config

    assert guidance_config(RunConfig(), "cpu").guided_pass == "micro-batch"
    assert guidance_config(RunConfig(), "cuda").guided_pass == "pool"
    assert guidance_config(RunConfig(guided_pass="pool"), "cpu").guided_pass == "pool"
