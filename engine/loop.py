"""The co-training loop (SPEC §4): one asynchronous loop in which a teacher-guided diffusion prior keeps producing
images while the student learns from them.

Each tick n
  1. hand-over (train stream): the micro-batches the generator finished in tick n−1 enter the replay buffer;
  2. generation (gen stream): start a micro-batch if one is due (starts are staggered so that micro-batches finish
     every few ticks); advance every sample in flight by one guided denoising step, all in one pool
     (engine/synthesis/pool.py), against the student snapshot written at the end of tick n−1;
  3. training (train stream, beside 2 on CUDA): ``kd_steps`` student updates on replay-buffer batches (the buffer
     as of tick n−1), once it holds ``min_buffer``; then the snapshot for tick n+1 (engine/streams.py);
  4. bookkeeping at intervals only (metrics, evaluation, checkpoints: the only host syncs; ``python -m
     benchmarks.host_syncs`` counts the rest, 0 per tick).
``--schedule offline`` runs the same loop with training held back until every image exists (the papers' protocol);
``--method real-kd`` fills the buffer from the real train set instead of a generator.

Multi-process (``accelerate launch --num_processes N -m engine.run``): rank r generates micro-batches r, r+N, ...
(disjoint seeds and classes) into its own replay buffer, the student trains with DDP, every rank runs the same
number of ticks and student steps (the image budget is rounded up to whole micro-batches per rank), metrics are
reduced, and only the main process writes; checkpoints gather every rank's buffer, pool and RNG into one file.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from augment.student_augment import student_augment
from engine.class_focus import class_kd_sums, class_means, draw_labels, focus_probs
from engine.config import RunConfig
from engine.datasets import as_tensors
from engine.errors import RunDiverged, UserError
from engine.evaluate import accuracy
from engine.outputs import RunOutputs, max_over_processes
from engine.replay_buffer import ReplayBuffer
from engine.stopping import Stopped, StopRequest
from engine.streams import StreamPair, copy_weights
from engine.synthesis import Finished, make_pool
from engine.world import World
from losses import WeightedSum, kd_kl_loss, msarc_loss

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Everything about progress that a checkpoint must restore (besides weights, optimizer, buffer, RNG)."""

    tick: int = 0
    student_step: int = 0
    batches_started: int = 0
    batches_finished: int = 0
    last_start_tick: int = -(10**9)
    kd_credit: float = 0.0  # fractional student steps owed (spreads steps evenly over the generation ticks)
    skipped_latent_steps: int = 0
    skipped_student_steps: int = 0  # student steps whose KD loss or gradient was not finite (no update made)
    best_acc: float = 0.0
    last_acc: float = 0.0  # test accuracy at the last evaluation (the final step always evaluates)
    elapsed_seconds: float = 0.0  # wall time the run has spent (restored on resume, so images/s stays honest)
    class_probs: list | None = None  # --class-focus: the class probabilities of new micro-batches (None: round-robin)
    class_kd_window: list | None = None  # --class-focus: the per-class KD sums and counts not yet read (checkpoints)


def micro_batch(cfg: RunConfig, index: int, num_classes: int,
                class_probs: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and seeds of (global) micro-batch ``index``: classes balanced round-robin (or drawn from
    ``class_probs``, --class-focus), one seed per image. The last one is cut to the budget; indices past it
    (multi-process rounding) are whole extra micro-batches."""
    first = index * cfg.gen_batch
    n = min(cfg.gen_batch, cfg.images - first) if first < cfg.images else cfg.gen_batch
    ids = torch.arange(first, first + n)
    labels = ids % num_classes if class_probs is None else draw_labels(class_probs, n, cfg.seed * 10_000_000 + first)
    return labels, cfg.seed * 10_000_000 + ids


def start_interval(cfg: RunConfig, steps_per_batch: int) -> int:
    """Ticks between micro-batch starts: ``in_flight`` batches of ``steps_per_batch`` steps never overlap more
    than ``in_flight`` deep, and one finishes every interval."""
    return math.ceil(steps_per_batch / cfg.in_flight)


def kd_rate(cfg: RunConfig, steps_per_batch: int, batches_left: int, steps_left: int, buffered: int = 0) -> float:
    """Student steps per tick so that the ``steps_left`` steps span the ticks that generate the ``batches_left``
    remaining micro-batches, from the first tick the buffer (now ``buffered`` images) holds ``min_buffer``. Counted
    from the current state (a resumed run continues its in-flight micro-batches from the checkpoint). Images
    reach the buffer the tick after they finish (4a below): that shifts the training window by one tick, not its
    length."""
    if cfg.kd_steps_per_tick:
        return float(cfg.kd_steps_per_tick)
    if batches_left <= 0:  # nothing left to generate (real-data KD, or a run resumed after synthesis)
        return 1.0
    stagger = start_interval(cfg, steps_per_batch)
    gen_ticks = (batches_left - 1) * stagger + steps_per_batch
    batches_to_fill = math.ceil(max(0, cfg.min_buffer - buffered) / cfg.gen_batch)
    first_training_tick = (batches_to_fill - 1) * stagger + steps_per_batch - 1 if batches_to_fill else 0
    return steps_left / max(1, gen_ticks - first_training_tick)


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 2% of the steps, then cosine decay to zero at ``steps``."""
    warmup = max(1, steps // 50)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def co_train(cfg: RunConfig, world: World, accelerator: Accelerator, outputs: RunOutputs,
             checkpoint: dict | None = None, stop: StopRequest | None = None) -> dict:
    """Run the loop; continue from ``checkpoint`` when given (``engine.run`` loads and validates it before it writes
    anything); ``stop``, once it holds a signal, ends the run with a checkpoint and :class:`Stopped`."""
    device = accelerator.device
    rank, ranks = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.seed + rank)
    teacher, view, info, generator = world.teacher.model, world.view, world.info, world.generator
    image_shape = (view.channels, view.size, view.size)
    if ranks > 1:  # each rank holds its share of the buffer and waits for its share of min_buffer
        cfg = dataclasses.replace(cfg, buffer_capacity=math.ceil(cfg.buffer_capacity / ranks) + cfg.gen_batch,
                                  min_buffer=math.ceil(cfg.min_buffer / ranks))

    # 1. Replay buffer (and, for real-data KD, its contents) ----------------------------------------------------------
    buffer = ReplayBuffer(cfg.buffer_capacity, image_shape, info.num_classes, device)
    outputs.watch(buffer)  # sample grids for the trackers at every evaluation
    if generator is None:
        fill_with_real_data(cfg, world, buffer, device)

    # 2. Student, optimizer, cosine schedule ----------------------------------------------------------------------
    student = world.student
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                                    weight_decay=cfg.weight_decay)
    else:
        # capturable: Adam's step count lives on the device, so the sync-free guard (student_step) can mask it too.
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      capturable=device.type == "cuda")
    schedule = cosine_schedule(optimizer, cfg.student_steps)
    student, optimizer = accelerator.prepare(student, optimizer)
    plain_student = accelerator.unwrap_model(student)
    # The generator reads a snapshot of the student, never the weights the optimizer is writing (engine/streams.py).
    snapshot = copy.deepcopy(plain_student).eval().requires_grad_(False)
    streams = StreamPair(device, cfg.use_streams)
    kd_loss = WeightedSum({"kl": 1.0, "msarc": cfg.msarc}, name="L_kd")
    log.info("synthesis: %s", generator.weighted.formula() if generator is not None else "real images (no synthesis)")
    log.info("student:   %s  (kl = τ²·KL(p_T^τ ‖ p_S^τ), τ=%g)", kd_loss.formula(), cfg.tau)
    # Replay-buffer draws and student augmentation come from a generator on the training device (no host RNG whose
    # numbers would have to be copied over); it is checkpointed, so a resumed run draws the same batches.
    batch_generator = torch.Generator(device).manual_seed(cfg.seed + 1 + 7919 * rank)

    # 3. The generation pool (every sample in flight, engine/synthesis/pool.py), resumed where it was ---------------
    # Its random numbers (CutMix boxes, DDPM noise) come from its own device generator, checkpointed with the pool.
    pool = make_pool(generator, torch.Generator(device).manual_seed(cfg.seed + 2 + 7919 * rank)) \
        if generator is not None else None
    pending: list[Finished] = []  # finished by the generator last tick, not yet in the buffer (see 4a)
    state = LoopState()
    if checkpoint is not None:
        plain_student.load_state_dict(checkpoint["student"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        shard = checkpoint["ranks"][rank]
        if not isinstance(shard["in_flight"], dict):
            raise UserError("the checkpoint predates the generation pool (its micro-batches in flight cannot be "
                            "continued); start anew with --overwrite")
        buffer.load_state_dict(shard["buffer"])
        state = LoopState(**checkpoint["state"])
        # The samples in flight continue where they were (latents, step indices, CutMix/repair state, RNG), so a
        # resumed run ends bit-identical to an uninterrupted one on CPU.
        if pool is not None:
            pool.load_state_dict(shard["in_flight"]["pool"])
        pending = [Finished(**{k: v.to(device) for k, v in f.items()}) for f in shard["in_flight"]["pending"]]
        set_rng_state(shard["rng"])
        batch_generator.set_state(shard["batch_generator"])
        log.info("resumed at tick %d, student step %d, %d images in the buffer", state.tick, state.student_step,
                 len(buffer))

    steps_per_batch = cfg.deepinv_iters if cfg.method == "deepinv" else cfg.sampler_steps
    # Micro-batches of this rank (global indices rank, rank + ranks, ...); every rank makes the same number.
    n_batches = math.ceil(cfg.images / cfg.gen_batch / ranks) if generator is not None else 0
    stagger = start_interval(cfg, steps_per_batch)
    rate = 1.0  # offline: one student step per tick once every image exists
    if cfg.schedule == "online":  # from the run's start, so a resumed run keeps the same rate
        # --kd-tail keeps that share of the steps for after synthesis (4c trains on at max(rate, 1) per tick).
        during_generation = cfg.student_steps - round(cfg.kd_tail * cfg.student_steps)
        rate = kd_rate(cfg, steps_per_batch, batches_left=n_batches, steps_left=during_generation)
    # Device-side running values, read on the host at log time only: the last finite KD terms, the mean guidance
    # terms of the log window, the skipped counts.
    window = {"images": 0, "start": time.time(), "kd": {}, "inv": {},
              "skipped": torch.zeros((), dtype=torch.long, device=device),
              "skipped_student": torch.zeros((), dtype=torch.long, device=device)}
    if cfg.class_focus > 0:  # (2, K): per-class Σ KD loss and Σ weight since the last metrics line, summed over
        # processes at log time; a resumed window (already the sum) goes to the main process alone
        window["class_kd"] = torch.zeros((2, info.num_classes), device=device)
        if state.class_kd_window and accelerator.is_main_process:
            window["class_kd"] += torch.tensor(state.class_kd_window, device=device)
    run_start = time.time() - state.elapsed_seconds
    last_checkpoint = time.time()
    streams.begin()  # both streams start after the set-up above (snapshot, buffer, restored state)

    # 4. The loop -----------------------------------------------------------------------------------------------------
    while state.student_step < cfg.student_steps or state.batches_finished < n_batches or pending:
        # 4a. Hand-over (train stream): what the generator finished in tick n−1 enters the replay buffer, so the
        # trainer of tick n reads the buffer as of tick n−1 and never waits for this tick's generation.
        if pending:
            with streams.on("train"):
                streams.wait("train", "generated")  # still tick n−1's event: tick n's generation is not queued yet
                for done in pending:
                    streams.hand_over(done.images, done.logits, done.label_weights, done.seeds, to="train")
                    buffer.add(done.images, done.logits, done.label_weights, done.seeds)
                    window["images"] += len(done)
            pending = []
        generating = state.batches_finished < n_batches  # images still to come, as this tick's trainer sees it

        # 4b. Generation (gen stream), against the student snapshot written at the end of tick n−1: start a
        # staggered micro-batch, advance every sample in flight by one step, keep what finished for tick n+1.
        if state.batches_finished < n_batches:
            with streams.on("gen"):
                streams.wait("gen", "snapshotted")
                # Warm-up in images made, the same in both schedules: offline, L_adv then targets the student as it
                # is during synthesis (untrained), online the student of the last tick.
                images_made = state.batches_finished * cfg.gen_batch * ranks
                adv_due = cfg.adv > 0 and images_made >= cfg.adv_warmup_images
                if adv_due and "adv" not in pool.weighted.active:  # warm-up over: L_adv on from now
                    pool.set_weights(adv=cfg.adv)
                due = state.tick - state.last_start_tick >= stagger
                if due and pool.in_flight < cfg.in_flight and state.batches_started < n_batches:
                    pool.admit(*micro_batch(cfg, rank + ranks * state.batches_started, info.num_classes,
                                            state.class_probs))
                    state.batches_started += 1
                    state.last_start_tick = state.tick
                with accelerator.autocast():  # bf16 UNet/decoder/teacher on CUDA; latents stay fp32
                    pending = pool.tick(snapshot)
                state.batches_finished += len(pending)
                streams.record("generated", "gen")

        # 4c. Training (train stream): student updates from the replay buffer (online: while generating; offline:
        # after), overlapping 4b; then the snapshot for tick n+1, once this tick's generation has stopped reading it.
        ready = len(buffer) >= cfg.min_buffer and (cfg.schedule == "online" or not generating)
        if ready and state.student_step < cfg.student_steps:
            state.kd_credit += rate if generating else max(rate, 1.0)
            n_steps = min(int(state.kd_credit), cfg.student_steps - state.student_step)
            state.kd_credit -= n_steps
            with streams.on("train"):
                for _ in range(n_steps):
                    terms, bad = student_step(cfg, student, plain_student, teacher, view, buffer, optimizer,
                                              accelerator, kd_loss, batch_generator, window.get("class_kd"))
                    window["skipped_student"] += bad.long()
                    # A skipped step keeps the last finite terms in the metrics (selected on the device).
                    window["kd"] = {k: torch.where(bad, window["kd"][k], v) if k in window["kd"] else v
                                    for k, v in terms.items()}
                    schedule.step()  # the schedule advances either way: a skipped step still spends its place
                    state.student_step += 1
                    if state.student_step % cfg.log_every == 0 or state.student_step == cfg.student_steps:
                        streams.join()  # host reads from here on (log interval)
                        if pool is not None:
                            window["skipped"] += pool.take_skipped()
                            window["inv"] = pool.take_terms() or window["inv"]  # the window's mean guidance terms
                        log_metrics(cfg, state, window, buffer, world, plain_student, outputs, run_start,
                                    accelerator)
                if n_steps:
                    streams.wait("train", "generated")
                    copy_weights(snapshot, plain_student)
                    streams.record("snapshotted", "train")
        elif pending:  # images made but no metrics line due (offline synthesis, a warming buffer): host counts only
            outputs.synthesis_progress(min(state.batches_finished * cfg.gen_batch * ranks, cfg.images), cfg.images)
        state.tick += 1

        # 4d. Checkpoint (host sync point) every --checkpoint-every ticks and --checkpoint-minutes, and on SIGINT or
        # SIGTERM. The save is a collective: every process takes the decision of the one that saw the clock or the
        # signal first (one host-side reduction per tick, multi-process only).
        clock_due = cfg.checkpoint_minutes > 0 and time.time() - last_checkpoint >= 60 * cfg.checkpoint_minutes
        due, signum = max_over_processes(accelerator, [state.tick % cfg.checkpoint_every == 0 or clock_due,
                                                       stop.signum if stop is not None else 0])
        if due or signum:
            streams.join()
            flush_counts(state, window, pool, accelerator)
            state.elapsed_seconds = time.time() - run_start
            outputs.save_checkpoint(accelerator, plain_student, optimizer, schedule, buffer, state, rng_state(),
                                    batch_generator.get_state(), in_flight_state(pool, pending))
            last_checkpoint = time.time()
            if signum:
                log.warning("stopped at tick %d, student step %d, checkpoint written: --resume continues", state.tick,
                            state.student_step)
                raise Stopped(signum)

    # 5. Final outputs (the last metrics line has evaluated the student) -------------------------------------------
    streams.join()
    flush_counts(state, window, pool, accelerator)
    state.elapsed_seconds = time.time() - run_start
    final_acc = state.last_acc  # evaluated by the metrics line of the last student step
    outputs.save_checkpoint(accelerator, plain_student, optimizer, schedule, buffer, state, rng_state(),
                            batch_generator.get_state(), in_flight_state(pool, []))
    images_made = int(accelerator.reduce(torch.tensor(buffer.total_added, device=device), "sum"))
    summary = {"student_acc": final_acc, "best_student_acc": state.best_acc, "student_steps": state.student_step,
               "images": images_made, "ticks": state.tick, "wall_seconds": round(state.elapsed_seconds, 1),
               "skipped_latent_steps": state.skipped_latent_steps,
               "skipped_student_steps": state.skipped_student_steps, "processes": ranks,
               "replay_exposure": buffer.exposure()}  # this process's buffer: draws per image, by arrival
    if cfg.class_focus > 0:  # the images each class got (soft targets summed over every process's buffer)
        per_class = accelerator.reduce(buffer.targets[: len(buffer)].sum(0), "sum")
        summary["images_per_class"] = [round(x, 2) for x in per_class.tolist()]
    # Diverged: most steps were skipped as non-finite (e.g. --lr 1e30, --step-size 1e30). The outputs are written
    # for inspection, but the run exits 3 instead of passing off a meaningless student (the counts are in summary).
    guided_per_image = steps_per_batch if cfg.method == "deepinv" else math.ceil(steps_per_batch / cfg.guide_every)
    latent_steps = images_made * guided_per_image if cfg.bn + cfg.cls + cfg.adv > 0 else 0
    summary["diverged"] = (state.skipped_student_steps > state.student_step / 2
                           or state.skipped_latent_steps > latent_steps / 2 > 0)
    outputs.write_final(accelerator, plain_student, buffer, info, summary, arch=cfg.student,
                        mean=world.teacher.mean, std=world.teacher.std, export=cfg.export)
    if summary["diverged"]:
        raise RunDiverged(f"the run diverged: {state.skipped_student_steps} of {state.student_step} student steps "
                          f"and {state.skipped_latent_steps} of about {latent_steps} latent steps were not finite and "
                          f"skipped (see summary.json in {outputs.dir}); lower --lr or --step-size")
    return summary


def student_step(cfg, student, plain_student, teacher, view, buffer, optimizer, accelerator, kd_loss, generator,
                 class_window: torch.Tensor | None = None):
    """One KD update: L_kd = τ²·KL(p_T^τ ‖ p_S^τ) + μ·L_mSARC on an augmented replay-buffer batch. Returns
    ``(terms, bad)``: the detached terms and a device bool, True when the step was not finite and was undone.
    ``class_window`` (--class-focus, (2, K)) gets the step's per-class KD sums and weights added, finite ones only.

    Guard, without a host sync: if L_kd or any gradient is not finite, the update is masked out: the optimizer steps
    anyway, then every parameter, BN running statistic (the forward pass has already moved them) and optimizer state
    tensor (moments, momentum, Adam's step count) becomes ``torch.where(bad, before, after)``, so nothing moves.
    Zeroing the gradients and stepping would not do, since AdamW still decays the weights and moments on a zero
    gradient; deciding on the host (``if bool(bad)``) would wait for the train stream every step. The cost is one copy
    of the student's weights, BN buffers and optimizer state per step. Under DDP the gradients are already averaged
    across processes and the flag is reduced too, so every process masks the same steps. With fp16 the GradScaler
    also skips overflowing steps itself (it reads its found-inf flag on the host: fp16 is the one mode that syncs).
    """
    images, cached_logits, targets = buffer.sample(cfg.batch_size, generator, balance=cfg.replay_balance)
    x = view.normalize(student_augment(images, cfg.aug_pad, cfg.aug_flip, generator))
    use_msarc = cfg.msarc > 0
    before = step_state(plain_student, optimizer)
    with accelerator.autocast():
        with torch.no_grad():  # the teacher sees the student's augmented view unless its cached logits are used
            view_logits, teacher_features = None, None  # the teacher on the augmented view
            if use_msarc:
                view_logits, teacher_features = teacher(x, return_features=True)
            elif cfg.teacher_logits == "recompute":
                view_logits = teacher(x)
            teacher_logits = cached_logits if cfg.teacher_logits == "cached" else view_logits
        student_out = student(x, return_features=use_msarc)
        student_logits, student_features = student_out if use_msarc else (student_out, None)
        terms = {"kl": kd_kl_loss(student_logits.float(), teacher_logits.float(), cfg.tau)}
        if use_msarc:
            # The CAMs' top class comes from the same augmented view as the features (not the cached logits).
            terms["msarc"] = msarc_loss(student_features, teacher_features, plain_student.classifier_weight(),
                                        teacher.classifier_weight(), view_logits)
        loss = kd_loss(terms)
    if class_window is not None:
        sums, weights = class_kd_sums(student_logits, teacher_logits, targets, cfg.tau)
        finite = torch.isfinite(sums)
        class_window += torch.stack([torch.where(finite, sums, 0.0), torch.where(finite, weights, 0.0)])
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    bad = ~torch.isfinite(loss.detach().float())
    grads = [p.grad for p in plain_student.parameters() if p.grad is not None]
    if grads:
        bad = bad | ~torch.stack([torch.isfinite(g).all() for g in grads]).all()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad.int().reshape(1), "sum")[0] > 0
    optimizer.step()
    undo_where(bad, before, step_state(plain_student, optimizer, copy=False))
    return {k: v.detach() for k, v in terms.items()} | {"L_kd": loss.detach()}, bad


def step_state(model: torch.nn.Module, optimizer, copy: bool = True) -> dict:
    """Every tensor a student step writes: parameters, buffers (BN statistics) and the optimizer's state, by a stable
    key; copies (``copy``) or the live tensors."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    out = {f"p{i}": p.data for i, p in enumerate(model.parameters())}
    out |= {f"b{i}": b for i, b in enumerate(model.buffers())}
    for i, p in enumerate(model.parameters()):
        for name, value in inner.state.get(p, {}).items():
            if torch.is_tensor(value):
                out[f"s{i}.{name}"] = value
    return {k: v.clone() for k, v in out.items()} if copy else out


@torch.no_grad()
def undo_where(bad: torch.Tensor, before: dict, after: dict) -> None:
    """``after ← where(bad, before, after)`` in place; optimizer state created by this step starts from zeros (the
    same as absent for SGD's momentum and Adam's moments and step count)."""
    for key, live in after.items():
        old = before.get(key)
        old = torch.zeros_like(live) if old is None else old
        live.copy_(torch.where(bad.to(live.device), old, live))


def fill_with_real_data(cfg: RunConfig, world: World, buffer: ReplayBuffer, device) -> None:
    """real-kd: ``--images`` real training images (a seeded subset of ``--real-split``) with the teacher's logits."""
    train_set = world.real_train
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.images]
    if hasattr(train_set, "images"):
        images, labels = train_set.images[pick].float() / 255, train_set.labels[pick]
    else:
        images, labels = as_tensors(torch.utils.data.Subset(train_set, pick.tolist()))
    for i in range(0, len(images), 500):
        x = world.view.to_teacher_images(images[i : i + 500].to(device))
        with torch.no_grad():
            logits = world.teacher.model(world.view.normalize(x))
        targets = torch.nn.functional.one_hot(labels[i : i + 500], world.info.num_classes).float()
        buffer.add(x, logits, targets.to(device), pick[i : i + 500])


def flush_counts(state: LoopState, window: dict, pool=None, accelerator=None) -> None:
    """Move the device-side skip counts into the host-side state (a host sync: log and checkpoint points only). With
    ``accelerator`` (checkpoint and end: a collective) the latent skips are summed over processes too, and the
    --class-focus window is copied into the state."""
    state.skipped_student_steps += int(window["skipped_student"])  # the same on every process (see student_step)
    window["skipped_student"].zero_()
    if accelerator is not None:
        if pool is not None:
            window["skipped"] += pool.take_skipped()
        state.skipped_latent_steps += int(accelerator.reduce(window["skipped"].reshape(1), "sum")[0])
        window["skipped"].zero_()
        if "class_kd" in window:  # summed over processes; on resume the main process carries it (see co_train)
            state.class_kd_window = accelerator.reduce(window["class_kd"].clone(), "sum").tolist()


def in_flight_state(pool, pending: list[Finished]) -> dict:
    """What a checkpoint keeps of the generation side: the pool's samples in flight and the finished micro-batches
    not yet handed to the buffer."""
    return {"pool": pool.state_dict() if pool is not None else None,
            "pending": [{k: v.clone() for k, v in vars(done).items()} for done in pending]}


def log_metrics(cfg, state, window, buffer, world, student, outputs: RunOutputs, run_start, accelerator) -> None:
    """One metrics.jsonl line (host syncs happen here, at log intervals only). Counts are summed over processes,
    losses averaged; every process calls this at the same student steps (the reductions are collective)."""
    device = accelerator.device
    now = time.time()
    counts = accelerator.reduce(torch.tensor([buffer.total_added, len(buffer), buffer.capacity, window["images"],
                                              int(window["skipped"])], device=device), "sum").tolist()
    line = {"tick": state.tick, "student_step": state.student_step, "images": counts[0],
            "buffer_fill": counts[1] / counts[2], "images_per_s": counts[3] / max(now - window["start"], 1e-9),
            "elapsed_s": round(now - run_start, 2)}
    for prefix, terms in (("kd_", window["kd"]), ("inv_", window["inv"])):
        for name, value in terms.items():
            line[prefix + name] = float(accelerator.reduce(value.detach().float().reshape(1), "mean"))
    state.skipped_latent_steps += counts[4]
    flush_counts(state, window)
    if "class_kd" in window:  # --class-focus: the window's per-class loss sets the classes of the next micro-batches
        sums, weights = accelerator.reduce(window["class_kd"].clone(), "sum").cpu()
        state.class_probs = focus_probs(sums, weights, state.class_probs, cfg.class_focus)
        line["class_kd"] = [None if m is None else round(m, 6) for m in class_means(sums, weights)]  # what they read
        line["class_probs"] = [round(p, 6) for p in state.class_probs]
        window["class_kd"].zero_()
    window["skipped"].zero_()  # window["inv"] stays: a line with no guided step since the last repeats its terms
    line["skipped_latent_steps"] = state.skipped_latent_steps
    line["skipped_student_steps"] = state.skipped_student_steps  # the same on every process (see student_step)
    if device.type == "cuda":
        line["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    evaluate = state.student_step % cfg.eval_every == 0 or state.student_step == cfg.student_steps
    if evaluate and accelerator.is_main_process:
        state.last_acc = accuracy(student, world.test_set, world.info, mean=world.teacher.mean,
                                  std=world.teacher.std, device=device)
        state.best_acc = max(state.best_acc, state.last_acc)
        line["student_acc"] = state.last_acc
    outputs.log(line)
    window["images"], window["start"] = 0, now

