"""The teacher-guided diffusion sampler (SPEC §2; DiffDFKD, Qi et al. 2025).

Notation (the variable names used below):
    z          z_t, the latent of a micro-batch at timestep t (the image itself for a pixel prior)
    eps        ε̂ = UNet(z_t, t, cond), with classifier-free guidance of scale s
    alpha_bar  ᾱ_t, the scheduler's cumulative alpha
    z0         ẑ0 = (z_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t)
    x0         x̂0 = clamp(D(ẑ0), 0, 1) with a straight-through clamp, then resized/normalised for the teacher
    L_inv      α·L_bn + β·L_cls + γ·L_adv

One guided step per timestep t, for one micro-batch:
    1. eps = UNet(z_t)                               (through the UNet, or detached: ``grad_mode``)
    2. z0, x0 from eps; teacher (and student) on x0
    3. z_t ← z_t − η·B·∇_{z_t} L_inv                 (B·: sum-reduced, so the per-sample step does not shrink with B)
    4. z_{t−1} = scheduler.step(eps', t, z_t)        (eps' recomputed on the updated z_t, or reused)
    5. every k steps: Latent CutMix, then r steps of seam repair (inpainting with the same prior)

A :class:`GenerationBatch` holds everything one micro-batch needs between steps, stepped with the prior's own
diffusers scheduler (any variance-preserving one): :meth:`GuidedSampler.sample` is the plain loop over
``scheduler.timesteps`` for offline synthesis (engine/synthesize.py). The co-training loop instead runs every
micro-batch in flight in one :class:`~engine.synthesis.pool.DiffusionPool`, which shares this sampler's latent
gradient (:meth:`GuidedSampler.latent_gradient`) and writes the DDIM/DDPM update out itself.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from augment.latent_cutmix import apply_cutmix, latent_cutmix, mix_labels, seam_band
from losses import WeightedSum, adversarial_loss, class_prior_loss
from losses.bn_stats import _batch_stat_term as batch_stat_term
from models.priors import SCHEDULERS


@dataclass
class GuidanceConfig:
    bn: float = 2.0  # α, BN-statistics weight (the engine default; was 0.1, then 1.0 until 2026-12-05)
    cls: float = 10.0  # β, class-prior weight
    cls_boundary: float = 0.0  # s: share of L_cls's target on the nearest other class (losses/class_prior.py)
    adv: float = 0.0  # γ, adversarial weight (the engine turns it on after its warm-up)
    step_size: float = 0.1  # η, per-sample latent step (the gradient is scaled by the batch size)
    guidance_ramp: float = 0.0  # ρ: η·(1 − ρ) at the noisiest step rising linearly to η·(1 + ρ) at the last
    guidance_scale: float = 2.0  # classifier-free guidance scale s of the prior
    steps: int = 25  # sampler steps
    grad_mode: str = "full"  # full: ∇ through the UNet's ε̂ and the decoder; detached: ε̂ held constant
    recompute_eps: bool = True  # recompute ε̂ on the updated z_t before the scheduler step
    guide_every: int = 1  # guide on every m-th timestep only (cost study)
    max_step_rms: float = 0.0  # cap on a sample's latent step (root-mean-square per element); 0 = no cap
    first_bn_multiplier: float = 1.0
    divergence: str = "kl"  # kl | js for the adversarial term
    cutmix_every: int = 0  # k: Latent CutMix every k steps (0 = off)
    cutmix_beta: float = 1.0
    cutmix_prob: float = 1.0  # fraction of the samples mixed at each CutMix event
    repair_steps: int = 0  # r: steps of seam repair after each CutMix (0 = no inpainting)
    repair_band: int = 1  # w: band width around the box edge, in latent pixels
    grad_chunk: int = 0  # latent gradient over chunks of this many samples (0 = the whole micro-batch)
    guided_pass: str = "pool"  # the pool's prior calls: over every sample in flight (pool) or per micro-batch
    grad_checkpointing: bool = False  # activation checkpointing in the prior's UNet/DiT and VAE decoder

    def weights(self) -> dict[str, float]:
        return {"bn": self.bn, "cls": self.cls, "adv": self.adv}

    def step_size_at(self, step_index: int) -> float:
        """η at sampler step i of S (0 = the noisiest): ``η·(1 + ρ·(2i/(S−1) − 1))``, a linear ramp whose mean over
        the S steps is η, so ``guidance_ramp`` ρ > 0 moves the same total guidance toward the clean end, where the
        decoded image is what the teacher will see (ρ = 0: η at every step). A host float: no device read."""
        if not self.guidance_ramp or self.steps < 2:
            return self.step_size
        return self.step_size * (1 + self.guidance_ramp * (2 * step_index / (self.steps - 1) - 1))


class TeacherView(nn.Module):
    """Prior images in [0, 1] -> the teacher's input: resize, adapt channels (RGB -> luminance or gray -> RGB),
    normalise with the teacher's mean/std."""

    def __init__(self, size: int, channels: int, mean, std):
        super().__init__()
        self.size, self.channels = size, channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def to_teacher_images(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and adapt channels; values stay in [0, 1]. (B, C_p, H_p, W_p) -> (B, C_t, size, size)."""
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True,
                                   align_corners=False)
        if images.shape[1] == 3 and self.channels == 1:
            images = (images * images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif images.shape[1] == 1 and self.channels == 3:
            images = images.expand(-1, 3, -1, -1)
        return images

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.to_teacher_images(images))


def straight_through_clamp(x: torch.Tensor) -> torch.Tensor:
    """clamp(x, 0, 1) forward, identity backward: a hard clamp would cut the gradient where x̂0 leaves [0, 1],
    which at high noise is most of the image (SPEC §8)."""
    return x + (x.clamp(0, 1) - x).detach()


@dataclass
class SeamRepair:
    """Inpainting state after a CutMix: in a mixed sample the seam ``band`` is regenerated and everything else is
    held to the mixed content, re-noised to each new level from its (ẑ0, ε) pair:
    z_known(t) = sqrt(ᾱ_t)·ẑ0 + sqrt(1 − ᾱ_t)·ε. A sample that was not mixed has no seam and is not held at all:
    ``free`` (band ∪ un-mixed samples) is where the sampler's own update survives."""

    free: torch.Tensor  # (B, 1, H, W) bool
    z0: torch.Tensor
    eps: torch.Tensor
    steps_left: int


@dataclass
class GenerationBatch:
    """One micro-batch in flight."""

    z: torch.Tensor  # (B, C, H, W) current latent z_t
    labels: torch.Tensor  # (B,) class the prior is conditioned on
    label_weights: torch.Tensor  # (B, K) soft targets for L_cls (one-hot until a CutMix)
    seeds: torch.Tensor  # (B,)
    cond: object
    scheduler: object  # this batch's own scheduler (multistep schedulers keep per-trajectory state)
    generator: torch.Generator  # CutMix boxes and stochastic scheduler noise
    step_index: int = 0
    repair: SeamRepair | None = None
    skipped: torch.Tensor | None = None  # samples whose latent step was skipped for a non-finite gradient
    last_terms: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.scheduler.timesteps)

    def __len__(self) -> int:
        return len(self.labels)


def alpha_bar(scheduler, t) -> torch.Tensor:
    if t is None:  # past the last step
        return torch.tensor(1.0)
    return scheduler.alphas_cumprod[int(t)]


class GroupedBNStats:
    """L_bn of each group of a batch in one teacher forward: forward pre-hooks on the teacher's BN layers (running
    statistics tracked) compute, for every group g (a slice of the batch), ``Σ_l m_l·‖μ_l(x_g) − μ_l^run‖₂ +
    ‖σ²_l(x_g) − σ²_l^run‖₂`` (``losses.bn_stats``, DeepInversion eq. 4), so samples of different micro-batches can
    share the forward without sharing batch statistics. ``m_0`` = ``first_multiplier``, ``m_l`` = 1 otherwise."""

    def __init__(self, model: nn.Module, groups: list[slice], first_multiplier: float = 1.0):
        self.groups, self.first_multiplier = groups, float(first_multiplier)
        layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  and m.running_mean is not None and m.running_var is not None]
        self._terms: dict[int, list[torch.Tensor]] = {}
        self._handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]
        self._zero = torch.zeros((), device=next(model.parameters()).device)

    def _hook(self, index: int):
        def hook(module, inputs) -> None:
            x = inputs[0]
            self._terms[index] = [batch_stat_term(x[g], module.running_mean, module.running_var) for g in self.groups]

        return hook

    def losses(self) -> list[torch.Tensor]:
        """One L_bn per group (in the order of BNStatHooks.loss: layers in module order)."""
        out = []
        for g in range(len(self.groups)):
            total = 0
            for index in sorted(self._terms):
                weight = self.first_multiplier if index == 0 else 1.0
                total = total + weight * self._terms[index][g]
            out.append(total if self._terms else self._zero)
        return out

    def __enter__(self) -> GroupedBNStats:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._terms.clear()


class GuidedSampler:
    """Steers a diffusion prior with a frozen teacher (and, for L_adv, the current student)."""

    def __init__(self, prior, teacher: nn.Module, teacher_view: TeacherView, num_classes: int,
                 config: GuidanceConfig):
        if not hasattr(prior.scheduler, "alphas_cumprod"):
            raise ValueError(f"{type(prior.scheduler).__name__} has no alphas_cumprod; guidance needs a "
                             f"variance-preserving scheduler ({', '.join(SCHEDULERS)})")
        self.prior, self.teacher, self.view, self.config = prior, teacher, teacher_view, config
        self.num_classes = num_classes
        self.weighted = WeightedSum(config.weights(), name="L_inv")
        self.device = next(teacher.parameters()).device
        self._scheduler = copy.deepcopy(prior.scheduler)
        self._scheduler.set_timesteps(config.steps, device=self.device)
        # ẑ0, the repair's re-noising and CutMix assume z_t = sqrt(ᾱ)·z0 + sqrt(1−ᾱ)·ε; sigma-parameterised
        # schedulers (Euler: z_t = z0 + σ·ε, init_noise_sigma ≫ 1) have alphas_cumprod too but do not follow it.
        if float(getattr(self._scheduler, "init_noise_sigma", 1.0)) != 1.0:
            raise ValueError(f"{type(prior.scheduler).__name__} is not variance-preserving (init_noise_sigma "
                             f"{float(self._scheduler.init_noise_sigma):g}); use {', '.join(SCHEDULERS)}")
        # Only stochastic schedulers take a generator (PNDM and UniPC do not accept the keyword).
        self._step_takes_generator = "generator" in inspect.signature(self._scheduler.step).parameters

    def set_weights(self, **weights: float) -> None:
        """Change α/β/γ during a run (e.g. L_adv after its warm-up)."""
        for name, value in weights.items():
            setattr(self.config, name, value)
        self.weighted = WeightedSum(self.config.weights(), name="L_inv")

    # 1. Prepare latents -------------------------------------------------------------------------------------------
    def start(self, labels: torch.Tensor, seeds: torch.Tensor) -> GenerationBatch:
        """Initial noise from one generator per sample seed, so a sample does not depend on its batch."""
        shape = self.prior.latent_shape
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        scheduler = copy.deepcopy(self._scheduler)
        z = z.to(self.device) * scheduler.init_noise_sigma
        labels = labels.to(self.device)
        return GenerationBatch(
            z=z, labels=labels, label_weights=F.one_hot(labels, self.num_classes).float(), seeds=seeds.cpu(),
            cond=self.prior.condition(labels), scheduler=scheduler,
            generator=torch.Generator().manual_seed(int(seeds[0]) * 1_000_003 + 17),
            skipped=torch.zeros((), dtype=torch.long, device=self.device),
        )

    # 2-3. Guided latent update ------------------------------------------------------------------------------------
    @torch.enable_grad()
    def guidance_step(self, batch: GenerationBatch, t, student: nn.Module | None) -> torch.Tensor:
        """One gradient step on z_t against L_inv; returns ε̂ at the *old* z_t (detached) for reuse.

        Memory. The graph of one step (UNet on 2B inputs for CFG, decoder, teacher, student) is what peaks, so
        ``grad_chunk = c`` runs forward + backward on chunks of c samples one after another and concatenates their
        latent gradients: peak activation memory scales with c, not B. Each chunk's step is scaled by its own size, z_i
        ← z_i − η·c·∇_{z_i} L_inv(chunk), so for the per-sample terms (L_cls, L_adv: batch means, and the teacher,
        student and prior act per sample in eval mode) every sample moves exactly as in one whole-batch step (η·B·∇ of
        a B-mean is η·∂ℓ_i/∂z_i either way). The same factor keeps L_bn's per-sample pull batch-size invariant: its
        batch statistics are means over the B samples, so ∂L_bn/∂z_i is O(1/B) and η·B·∂L_bn/∂z_i is O(1) (``python -m
        benchmarks.bn_batch_scaling``: the same RMS step at B = 8 … 100). But L_bn is not per sample: it compares the
        *chunk's* BN statistics with the running ones, so with chunks it steers each chunk's statistics, a different
        (noisier, for small c) objective than the micro-batch's. ``last_terms`` are the chunk-size-weighted means (for
        the per-sample terms: the whole-batch values). ``grad_checkpointing`` makes the prior keep only block inputs
        and recompute the rest during the backward pass (about one more UNet/decoder forward per guided step).
        """
        cfg = self.config
        self.prior.enable_gradient_checkpointing(cfg.grad_checkpointing)
        n = len(batch)
        size = cfg.grad_chunk if 0 < cfg.grad_chunk < n else n
        steps, eps, sums = [], [], {}
        for start in range(0, n, size):
            part = slice(start, min(start + size, n))
            step, part_eps, terms = self._chunk_step(batch, part, t, student)
            steps.append(step)
            eps.append(part_eps)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value * (part.stop - part.start)
        step = torch.cat(steps) if len(steps) > 1 else steps[0]
        if batch.repair is not None:  # a held region is overwritten after this step: do not move it
            step = step * batch.repair.free
        if cfg.max_step_rms > 0:  # at high noise ∂ẑ0/∂z_t ~ 1/sqrt(ᾱ_t): cap a sample's move, keep its direction
            rms = step.flatten(1).pow(2).mean(1).sqrt()
            step = step * (cfg.max_step_rms / rms.clamp_min(cfg.max_step_rms))[:, None, None, None]
        batch.z = (batch.z - step).detach()
        batch.last_terms = {name: value / n for name, value in sums.items()} if len(steps) > 1 else terms
        return torch.cat(eps) if len(eps) > 1 else eps[0]

    def _chunk_step(self, batch: GenerationBatch, part: slice, t, student: nn.Module | None):
        """η·c·∇_{z_t} L_inv (η of the batch's step, ``GuidanceConfig.step_size_at``) on the c samples ``part`` of
        the batch (zero for a sample whose gradient is not finite); returns (step, ε̂ detached, terms detached). The
        graph is freed before the next chunk starts."""
        n = part.stop - part.start
        cond = batch.cond if n == len(batch) else batch.cond.select(torch.arange(part.start, part.stop))
        model_input = batch.scheduler.scale_model_input(batch.z[part], t)
        grad, eps, (terms,) = self.latent_gradient(model_input, t, alpha_bar(batch.scheduler, t), cond,
                                                   batch.label_weights[part], [slice(0, n)], student)
        # Guard: a sample whose gradient is not finite keeps its latent (counted, no host sync here).
        finite = torch.isfinite(grad).flatten(1).all(1)
        batch.skipped += (~finite).sum()
        step = self.config.step_size_at(batch.step_index) * n * torch.where(finite[:, None, None, None], grad,
                                                                           torch.zeros_like(grad))
        return step, eps, terms

    @torch.enable_grad()
    def latent_gradient(self, z: torch.Tensor, t, a: torch.Tensor, cond, label_weights: torch.Tensor,
                        groups: list[slice], student: nn.Module | None):
        """∇_z Σ_g L_inv,g for samples that may sit at different timesteps, in one forward and backward pass.

        ``t`` is the timestep (a number, or one per sample (B,)) and ``a`` its ᾱ_t (a scalar or (B, 1, 1, 1)). The
        samples form ``groups`` (slices; the micro-batches of a pool, or one chunk): L_inv,g is the micro-batch
        objective of group g alone, α·L_bn(g's BN statistics) + β·L_cls + γ·L_adv with g's batch means, so the
        gradient of sample i is exactly the one its own group would give on its own (the teacher, student and prior
        act per sample in eval mode; only L_bn couples samples, within a group). Returns (gradient, ε̂ detached,
        the detached terms of each group, ``L_inv`` included)."""
        cfg = self.config
        z = z.detach().requires_grad_(True)
        if cfg.grad_mode == "full":
            eps = self.prior.predict_noise(z, t, cond, cfg.guidance_scale)
        else:
            with torch.no_grad():
                eps = self.prior.predict_noise(z, t, cond, cfg.guidance_scale)
        z0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        x = self.view(straight_through_clamp(self.prior.decode_for_guidance(z0)))
        active = self.weighted.active
        if "bn" in active:  # hooks live for this one forward only
            with GroupedBNStats(self.teacher, groups, first_multiplier=cfg.first_bn_multiplier) as bn_hooks:
                teacher_logits = self.teacher(x)
                bn_terms = bn_hooks.losses()
        else:
            teacher_logits = self.teacher(x)
        student_logits = student(x) if "adv" in active and student is not None else None
        per_group, total = [], None
        for g, rows in enumerate(groups):
            terms = {"bn": bn_terms[g]} if "bn" in active else {}
            if "cls" in active:
                terms["cls"] = class_prior_loss(teacher_logits[rows], label_weights[rows], cfg.cls_boundary)
            if "adv" in active and student_logits is not None:
                terms["adv"] = adversarial_loss(teacher_logits[rows], student_logits[rows], divergence=cfg.divergence)
            elif "adv" in active:
                terms["adv"] = teacher_logits.new_zeros(())
            loss = self.weighted(terms)
            total = loss if total is None else total + loss
            per_group.append({k: v.detach() for k, v in terms.items()} | {"L_inv": loss.detach()})
        (grad,) = torch.autograd.grad(total, z)
        return grad, eps.detach(), per_group

    # 4-5. Denoise, CutMix, repair ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, batch: GenerationBatch, student: nn.Module | None = None) -> None:
        """Advance a micro-batch by one timestep (guided when the config says so)."""
        cfg = self.config
        timesteps = batch.scheduler.timesteps
        i = batch.step_index
        t = timesteps[i]
        guided = bool(self.weighted.active) and i % cfg.guide_every == 0
        eps = self.guidance_step(batch, t, student) if guided else None
        if eps is None or cfg.recompute_eps:
            eps = self.prior.predict_noise(batch.scheduler.scale_model_input(batch.z, t), t, batch.cond,
                                           cfg.guidance_scale)
        z_t = batch.z
        noise = {"generator": batch.generator} if self._step_takes_generator else {}
        batch.z = batch.scheduler.step(eps, t, z_t, **noise).prev_sample
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        a_prev = alpha_bar(batch.scheduler, t_prev).to(z_t.device)

        if batch.repair is not None:  # hold everything outside the band to the mixed content at the new level
            known = a_prev.sqrt() * batch.repair.z0 + (1 - a_prev).sqrt() * batch.repair.eps
            batch.z = torch.where(batch.repair.free, batch.z, known)
            batch.repair.steps_left -= 1
            if batch.repair.steps_left <= 0:
                batch.repair = None

        steps_left = len(timesteps) - (i + 1)
        if cfg.cutmix_every and (i + 1) % cfg.cutmix_every == 0 and steps_left > cfg.repair_steps:
            a = alpha_bar(batch.scheduler, t).to(z_t.device)
            z0 = (z_t - (1 - a).sqrt() * eps) / a.sqrt()
            self.cutmix(batch, z0, a_prev)
        batch.step_index += 1

    def cutmix(self, batch: GenerationBatch, z0: torch.Tensor, a_prev: torch.Tensor) -> None:
        """Latent CutMix on z_{t−1}, then (if r > 0) start the seam repair."""
        cfg = self.config
        _, _, h, w = batch.z.shape
        mix = latent_cutmix(len(batch), h, w, cfg.cutmix_beta, batch.generator, batch.z.device, cfg.cutmix_prob)
        # The ε that, with ẑ0, reproduces z_{t−1} exactly: the repair re-noises both halves consistently.
        eps_implied = (batch.z - a_prev.sqrt() * z0) / (1 - a_prev).clamp_min(1e-8).sqrt()
        batch.z = apply_cutmix(batch.z, mix)
        batch.label_weights = mix_labels(batch.label_weights, mix)
        if cfg.repair_steps > 0:
            mixed = mix.box.flatten(1).any(1)[:, None, None, None]  # (B, 1, 1, 1); misses of cutmix_prob are not
            free = seam_band(mix.box, cfg.repair_band) | ~mixed
            batch.repair = SeamRepair(free, apply_cutmix(z0, mix), apply_cutmix(eps_implied, mix), cfg.repair_steps)

    # Checkpoints: a micro-batch in flight, saved and restored exactly --------------------------------------------
    def batch_state(self, batch: GenerationBatch) -> dict:
        """A copy (the live batch keeps stepping, partly in place) of everything the rest of its trajectory depends
        on; the conditioning is recomputed from the labels."""
        state = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if f.name not in ("cond", "z")}
        return copy.deepcopy(state | {"z": batch.z.detach(), "generator": batch.generator.get_state()})

    def restore_batch(self, state: dict) -> GenerationBatch:
        saved = {name: value.to(self.device) if isinstance(value, torch.Tensor) and name != "seeds" else value
                 for name, value in state.items()}
        if saved["repair"] is not None:
            repair = saved["repair"]
            saved["repair"] = SeamRepair(repair.free.to(self.device), repair.z0.to(self.device),
                                         repair.eps.to(self.device), repair.steps_left)
        saved["generator"] = torch.Generator().set_state(state["generator"])
        return GenerationBatch(cond=self.prior.condition(saved["labels"]), **saved)

    # 6. Decode ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def finish(self, batch: GenerationBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Images at the teacher's resolution and channels, in [0, 1], and the teacher's logits on them."""
        images = self.view.to_teacher_images(self.prior.decode(batch.z).clamp(0, 1))
        return images, self.teacher(self.view.normalize(images))

    def sample(self, labels: torch.Tensor, seeds: torch.Tensor, student: nn.Module | None = None):
        """The offline loop: ``for t in scheduler.timesteps`` on one batch; returns (images, teacher logits, batch)."""
        batch = self.start(labels, seeds)
        while not batch.done:
            self.step(batch, student)
        images, logits = self.finish(batch)
        return images, logits, batch
