"""The generation pool of the co-training loop: every sample in flight in one latent tensor, one tick at a time.

Micro-batches are admitted at staggered ticks, so at any tick the samples of the pool sit at different step
indices. Per tick, for all of them at once:

    1. guided samples (their micro-batch's step index i with i % guide_every == 0; decided on the host, which knows
       every micro-batch's start tick): one forward + backward of the prior (CFG), decoder, teacher and student,
       z_t ← z_t − η·B·∇_{z_t} L_inv with each micro-batch's own L_inv (:meth:`GuidedSampler.latent_gradient`);
    2. ε̂ = UNet(z_t, t) with one batched CFG call, the timesteps one per sample (B,);
    3. the scheduler update, written out from device tables of ᾱ (index = per-sample step index):
           ẑ0 = (z_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t)                      (clipped when the scheduler clips)
           DDIM (η = 0): z_{t−1} = sqrt(ᾱ_{t−1})·ẑ0 + sqrt(1 − ᾱ_{t−1})·ε̂
           DDPM:         z_{t−1} = sqrt(ᾱ_{t−1})·β_t/(1 − ᾱ_t)·ẑ0 + sqrt(α_t)·(1 − ᾱ_{t−1})/(1 − ᾱ_t)·z_t + σ_t·n,
                         σ_t² = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t (0 at the last step), α_t = ᾱ_t/ᾱ_{t−1}, β_t = 1 − α_t
       (what diffusers' DDIMScheduler/DDPMScheduler.step compute; ``tests/test_pool.py`` checks it against them);
    4. seam repair and Latent CutMix per micro-batch (engine/synthesis/guided.py has the maths);
    5. micro-batches at their last step leave the pool (oldest first: every one takes the same number of steps),
       are decoded and scored by the teacher.

Nothing in a tick reads the device on the host: step indices, timesteps and ᾱ are gathered on the device, the
micro-batch bookkeeping (sizes, step index, repair state) is host-side, random numbers come from a generator on
the device, and the skipped-sample count stays on the device until the loop's log interval.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from augment.latent_cutmix import apply_cutmix, latent_cutmix, mix_labels, seam_band
from engine.synthesis.guided import GuidedSampler, SeamRepair
from engine.synthesis.protocol import Finished, PoolCounters
from models.priors import Cond

INLINE_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")


@dataclass
class Block:
    """Host-side bookkeeping of one micro-batch in the pool (its rows follow the previous block's)."""

    size: int
    step_index: int = 0
    repair: SeamRepair | None = None


def step_tables(scheduler, steps: int, device) -> dict[str, torch.Tensor]:
    """Per step index (S,): timestep, ᾱ_t, ᾱ_{t−1} and, for DDPM, the posterior coefficients and σ_t, from a
    DDIM or DDPM scheduler's own ``set_timesteps`` and ``alphas_cumprod`` (computed once, in float32 as there)."""
    name = type(scheduler).__name__
    if name not in INLINE_SCHEDULERS:
        raise ValueError(f"the generation pool steps DDIM or DDPM (ddim, ddpm), not {name}; offline synthesis "
                         "(engine.synthesize) takes any variance-preserving scheduler")
    config = scheduler.config
    if config.get("thresholding"):
        raise ValueError(f"{name} with thresholding is not supported by the generation pool; use clip_sample")
    if name == "DDPMScheduler" and config.get("variance_type", "fixed_small") != "fixed_small":
        raise ValueError(f"DDPMScheduler variance_type {config.variance_type!r}: the pool implements fixed_small")
    s = copy.deepcopy(scheduler)
    s.set_timesteps(steps)
    timesteps = s.timesteps.long()
    prev = timesteps - config.num_train_timesteps // s.num_inference_steps
    cumprod = s.alphas_cumprod
    final = s.final_alpha_cumprod if name == "DDIMScheduler" else s.one
    a = cumprod[timesteps]
    a_prev = torch.where(prev >= 0, cumprod[prev.clamp_min(0)], final)
    tables = {"t": timesteps, "sqrt_a": a ** 0.5, "sqrt_1ma": (1 - a) ** 0.5, "a": a, "a_prev": a_prev,
              "sqrt_a_prev": a_prev ** 0.5, "sqrt_1ma_prev": (1 - a_prev) ** 0.5}
    if name == "DDPMScheduler":
        alpha = a / a_prev
        beta = 1 - alpha
        tables["c_x0"] = a_prev ** 0.5 * beta / (1 - a)
        tables["c_z"] = alpha ** 0.5 * (1 - a_prev) / (1 - a)
        variance = torch.clamp((1 - a_prev) / (1 - a) * beta, min=1e-20)
        tables["sigma"] = torch.where(timesteps > 0, variance ** 0.5, torch.zeros_like(variance))
    clip = float(config.clip_sample_range) if config.get("clip_sample") else 0.0
    return {k: v.to(device) for k, v in tables.items()} | {"kind": name, "clip": clip}


def _rows(x, slices: list[slice]):
    """The rows of ``x`` (a tensor or a Cond) in ``slices``, concatenated (no index tensor)."""
    if isinstance(x, Cond):
        whole = len(slices) == 1 and slices[0] == slice(0, len(x))
        return x if whole else Cond.cat([x.select_rows(s) for s in slices])
    if len(slices) == 1:
        return x[slices[0]]
    return torch.cat([x[s] for s in slices])


class DiffusionPool(PoolCounters):
    """All in-flight samples of a :class:`GuidedSampler` in one latent tensor (see the module docstring)."""

    def __init__(self, sampler: GuidedSampler, rng: torch.Generator):
        self.sampler, self.rng = sampler, rng
        self.prior, self.teacher, self.view, self.config = sampler.prior, sampler.teacher, sampler.view, sampler.config
        self.device = sampler.device
        self.tables = step_tables(sampler.prior.scheduler, sampler.config.steps, self.device)
        self.steps = len(self.tables["t"])
        self._empty()

    def _empty(self) -> None:
        c, h, w = self.prior.latent_shape
        self.blocks: list[Block] = []
        self.z = torch.zeros((0, c, h, w), device=self.device)  # (N, C, H, W) z_t of every sample in flight
        self.step = torch.zeros(0, dtype=torch.long, device=self.device)  # (N,) step index
        self.labels = torch.zeros(0, dtype=torch.long, device=self.device)  # (N,)
        self.label_weights = torch.zeros((0, self.sampler.num_classes), device=self.device)  # (N, K) soft labels
        self.seeds = torch.zeros(0, dtype=torch.long, device=self.device)  # (N,)
        self.cond: Cond | None = None
        self.skipped = torch.zeros((), dtype=torch.long, device=self.device)
        self._last_terms: dict[str, torch.Tensor] = {}
        self._term_window: dict = {}

    # The guided sampler owns the term weights (L_adv's warm-up switches them during a run).
    @property
    def weighted(self):
        return self.sampler.weighted

    def set_weights(self, **weights: float) -> None:
        self.sampler.set_weights(**weights)

    @property
    def in_flight(self) -> int:
        return len(self.blocks)

    def __len__(self) -> int:
        return sum(b.size for b in self.blocks)

    def _slices(self) -> list[slice]:
        out, start = [], 0
        for block in self.blocks:
            out.append(slice(start, start + block.size))
            start += block.size
        return out

    # 1. Admit ---------------------------------------------------------------------------------------------------
    def admit(self, labels: torch.Tensor, seeds: torch.Tensor) -> None:
        """Initial noise from one generator per sample seed (on the host, as :meth:`GuidedSampler.start`), so a
        sample does not depend on its batch or on what else is in flight; host tensors go over without a sync."""
        shape = self.prior.latent_shape
        seed_list = [int(s) for s in seeds.tolist()]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seed_list])
        self._append(noise.to(self.device, non_blocking=True), labels.to(torch.long),
                     seeds.to(self.device, non_blocking=True), Block(len(seed_list)))

    def _append(self, z, labels, seeds, block: Block, label_weights=None, step=None) -> None:
        k = self.label_weights.shape[1]
        cond = self.prior.condition(labels)  # checks host labels on the host
        labels = labels.to(self.device, non_blocking=True)
        if label_weights is None:  # one-hot without F.one_hot, whose range check reads the device
            label_weights = (labels[:, None] == torch.arange(k, device=self.device)).float()
        step = torch.full((block.size,), block.step_index, dtype=torch.long, device=self.device) if step is None \
            else step
        self.z = torch.cat([self.z, z])
        self.labels, self.seeds = torch.cat([self.labels, labels]), torch.cat([self.seeds, seeds])
        self.label_weights = torch.cat([self.label_weights, label_weights])
        self.step = torch.cat([self.step, step])
        self.cond = cond if self.cond is None else Cond.cat([self.cond, cond])
        self.blocks.append(block)

    # 2-5. One tick ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def tick(self, student: nn.Module | None = None) -> list[Finished]:
        if not self.blocks:
            return []
        cfg, tables = self.config, self.tables
        slices = self._slices()
        t = tables["t"][self.step]  # (N,)
        col = (-1, 1, 1, 1)
        sqrt_a, sqrt_1ma = tables["sqrt_a"][self.step].view(col), tables["sqrt_1ma"][self.step].view(col)

        guided = [b.step_index % cfg.guide_every == 0 for b in self.blocks] if self.weighted.active else []
        eps = None
        if any(guided):
            eps = self._guide([s for s, g in zip(slices, guided) if g], [b for b, g in zip(self.blocks, guided) if g],
                              t, student)
        if eps is None or cfg.recompute_eps or not all(guided):
            if cfg.guided_pass == "micro-batch":  # on CPU 4 calls of 50 take half the time of one call of 200
                eps_all = torch.cat([self.prior.predict_noise(self.z[s], t[s], self.cond.select_rows(s),
                                                              cfg.guidance_scale) for s in slices])
            else:
                eps_all = self.prior.predict_noise(self.z, t, self.cond, cfg.guidance_scale)  # one batched CFG call
            if eps is not None and not cfg.recompute_eps:  # reuse ε̂ of the guided rows (computed before the step)
                eps_all = torch.cat([eps_part if g else eps_all[s]
                                     for s, g, eps_part in zip(slices, guided, self._split(eps, guided, slices))])
            eps = eps_all

        z_t = self.z
        z0 = (z_t - sqrt_1ma * eps) / sqrt_a
        x0 = z0.clamp(-tables["clip"], tables["clip"]) if tables["clip"] else z0
        if tables["kind"] == "DDIMScheduler":
            z = tables["sqrt_a_prev"][self.step].view(col) * x0 + tables["sqrt_1ma_prev"][self.step].view(col) * eps
        else:
            noise = self._noise(z_t.shape)
            z = tables["c_x0"][self.step].view(col) * x0 + tables["c_z"][self.step].view(col) * z_t
            z = z + tables["sigma"][self.step].view(col) * noise

        a_prev = tables["a_prev"][self.step].view(col)
        for block, s in zip(self.blocks, slices):
            if block.repair is not None:  # hold everything outside the band to the mixed content at the new level
                known = a_prev[s].sqrt() * block.repair.z0 + (1 - a_prev[s]).sqrt() * block.repair.eps
                z[s] = torch.where(block.repair.free, z[s], known)
                block.repair.steps_left -= 1
                if block.repair.steps_left <= 0:
                    block.repair = None
            i = block.step_index
            if cfg.cutmix_every and (i + 1) % cfg.cutmix_every == 0 and self.steps - (i + 1) > cfg.repair_steps:
                self._cutmix(block, s, z, z0[s], a_prev[s])
            block.step_index += 1
        self.z = z
        self.step = self.step + 1
        return self._pop_finished()

    def _split(self, eps_guided: torch.Tensor, guided: list[bool], slices: list[slice]) -> list:
        """ε̂ of the guided rows (concatenated) back into per-block pieces (None for unguided blocks)."""
        out, start = [], 0
        for s, g in zip(slices, guided):
            n = s.stop - s.start
            out.append(eps_guided[start:start + n] if g else None)
            start += n if g else 0
        return out

    def _guide(self, slices: list[slice], blocks: list[Block], t: torch.Tensor, student) -> torch.Tensor:
        """The latent step of the guided micro-batches (rows ``slices``), in place on ``self.z``; returns their ε̂ at
        the old z_t. One forward + backward for all of them (``guided_pass="pool"``), one per micro-batch
        (``"micro-batch"``), or chunks of ``grad_chunk`` samples (each its own L_bn group, as
        GuidedSampler.guidance_step does) one after another to bound the activation memory."""
        cfg, tables = self.config, self.tables
        starts = {id(b): s.start for s, b in zip(self._slices(), self.blocks)}
        if cfg.grad_chunk > 0:
            passes = [[(slice(s.start + c, min(s.start + c + cfg.grad_chunk, s.stop)), b)]
                      for s, b in zip(slices, blocks) for c in range(0, s.stop - s.start, cfg.grad_chunk)]
        elif cfg.guided_pass == "micro-batch":  # smaller graphs: on CPU the whole-pool graph runs 1.4-1.6x slower
            passes = [[(s, b)] for s, b in zip(slices, blocks)]
        else:
            passes = [list(zip(slices, blocks))]
        eps_parts, sums, count = [], {}, 0
        for rows in passes:
            where = [s for s, _ in rows]
            local, start = [], 0
            for s in where:
                local.append(slice(start, start + s.stop - s.start))
                start = local[-1].stop
            a = tables["a"][_rows(self.step, where)].view(-1, 1, 1, 1)
            grad, eps, terms = self.sampler.latent_gradient(
                _rows(self.z, where), _rows(t, where), a, _rows(self.cond, where), _rows(self.label_weights, where),
                local, student)
            finite = torch.isfinite(grad).flatten(1).all(1)  # guard: a non-finite sample keeps its latent
            self.skipped += (~finite).sum()
            grad = torch.where(finite[:, None, None, None], grad, torch.zeros_like(grad))
            for (s, block), part, group_terms in zip(rows, local, terms):
                n = s.stop - s.start
                step = cfg.step_size_at(block.step_index) * n * grad[part]  # η·B: the step does not shrink with B
                if block.repair is not None:  # a held region is overwritten after this step: do not move it
                    offset = s.start - starts[id(block)]
                    step = step * block.repair.free[offset:offset + n]
                if cfg.max_step_rms > 0:  # cap a sample's move, keep its direction
                    rms = step.flatten(1).pow(2).mean(1).sqrt()
                    step = step * (cfg.max_step_rms / rms.clamp_min(cfg.max_step_rms))[:, None, None, None]
                self.z[s] = self.z[s] - step
                for name, value in group_terms.items():
                    sums[name] = sums.get(name, 0.0) + value * n
                count += n
            eps_parts.append(eps)
        self.record_terms({name: value / count for name, value in sums.items()}, count)
        return eps_parts[0] if len(eps_parts) == 1 else torch.cat(eps_parts)

    def _noise(self, shape) -> torch.Tensor:
        """DDPM's fresh noise for every sample, from the pool's device generator."""
        return torch.randn(shape, generator=self.rng, device=self.device)

    def _cutmix(self, block: Block, s: slice, z: torch.Tensor, z0: torch.Tensor, a_prev: torch.Tensor) -> None:
        """Latent CutMix within one micro-batch on z_{t−1} (rows ``s`` of ``z``, in place), then its seam repair."""
        cfg = self.config
        _, _, h, w = z.shape
        mix = latent_cutmix(block.size, h, w, cfg.cutmix_beta, self.rng, self.device, cfg.cutmix_prob)
        # The ε that, with ẑ0, reproduces z_{t−1} exactly: the repair re-noises both halves consistently.
        eps_implied = (z[s] - a_prev.sqrt() * z0) / (1 - a_prev).clamp_min(1e-8).sqrt()
        z[s] = apply_cutmix(z[s], mix)
        self.label_weights[s] = mix_labels(self.label_weights[s], mix)
        if cfg.repair_steps > 0:
            mixed = mix.box.flatten(1).any(1)[:, None, None, None]  # (B, 1, 1, 1); misses of cutmix_prob are not
            free = seam_band(mix.box, cfg.repair_band) | ~mixed
            block.repair = SeamRepair(free, apply_cutmix(z0, mix), apply_cutmix(eps_implied, mix), cfg.repair_steps)

    def _pop_finished(self) -> list[Finished]:
        done = 0
        while done < len(self.blocks) and self.blocks[done].step_index >= self.steps:
            done += 1
        if not done:
            return []
        sizes = [b.size for b in self.blocks[:done]]
        n = sum(sizes)
        images = self.view.to_teacher_images(self.prior.decode(self.z[:n]).clamp(0, 1))
        logits = self.teacher(self.view.normalize(images))
        finished, start = [], 0
        for size in sizes:
            part = slice(start, start + size)
            finished.append(Finished(images[part], logits[part], self.label_weights[part], self.seeds[part]))
            start += size
        self.blocks = self.blocks[done:]
        self.z, self.step, self.labels = self.z[n:], self.step[n:], self.labels[n:]
        self.label_weights, self.seeds = self.label_weights[n:], self.seeds[n:]
        self.cond = self.cond.select_rows(slice(n, None)) if self.blocks else None
        return finished

    # Checkpoints (the log-time counters come from PoolCounters) ---------------------------------------------------
    def state_dict(self) -> dict:
        """A copy of everything in flight (the conditioning is recomputed from the labels)."""
        return copy.deepcopy({
            "z": self.z, "step": self.step, "labels": self.labels, "label_weights": self.label_weights,
            "seeds": self.seeds, "rng": self.rng.get_state(), **self.counters_state(),
            "blocks": [(b.size, b.step_index, None if b.repair is None else
                        (b.repair.free, b.repair.z0, b.repair.eps, b.repair.steps_left)) for b in self.blocks]})

    def load_state_dict(self, state: dict) -> None:
        self._empty()
        self.rng.set_state(state["rng"])
        self.load_counters(state, self.device)
        start = 0
        for size, step_index, repair in state["blocks"]:
            rows = slice(start, start + size)
            start += size
            if repair is not None:
                free, z0, eps, left = repair
                repair = SeamRepair(free.to(self.device), z0.to(self.device), eps.to(self.device), left)
            self._append(state["z"][rows].to(self.device), state["labels"][rows].to(self.device),
                         state["seeds"][rows].to(self.device), Block(size, step_index, repair),
                         state["label_weights"][rows].to(self.device), state["step"][rows].to(self.device))
