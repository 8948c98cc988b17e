"""Train an embedded world's diffusion prior: a class-conditional pixel DDPM on data the teacher never saw.

The prior must never see the teacher's data (SPEC §7). The digits world's prior learns the *concept* of each digit
from 1,797 UCI 8x8 scans (upsampled, thick and blurry), the way Stable Diffusion knows "airplane" without having
seen CIFAR-10; the fashion world's prior learns from half B of Fashion-MNIST's train set, the teacher from half A.

    python -m engine.train_prior --steps 1200 --out models/weights/prior-digits
    python -m engine.train_prior --dataset fashion-mnist --split half-b --jitter-copies 0 --batch-size 64 \
        --steps 2000 --out models/weights/prior-fashion

Writes a diffusers folder (``unet/``, ``scheduler/``), ``provenance.json`` and, with the sampler, a samples grid.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torchvision.transforms import v2

from engine.checkpoints import atomic_dir
from engine.datasets import load_dataset, split_provenance
from engine.errors import exits_cleanly
from engine.logs import setup_logging
from engine.train_teacher import machine_record

log = logging.getLogger(__name__)
NULL_CLASS = 10  # the extra class embedding used for classifier-free guidance


def build_prior_unet(num_classes: int = 10, sample_size: int = 28, channels: int = 1) -> UNet2DModel:
    """The default world's UNet: ~1M parameters, no attention, one class embedding per class plus a null class."""
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        num_class_embeds=num_classes + 1,
    )


def build_prior_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def train_prior(
    steps: int, batch_size: int = 128, lr: float = 1e-3, ema_decay: float = 0.995, label_dropout: float = 0.1,
    seed: int = 0,
    jitter_copies: int = 16,
    dataset: str = "digits",
    split: str = "all",
) -> tuple[UNet2DModel, DDPMScheduler, dict]:
    torch.manual_seed(seed)
    data_record = split_provenance(dataset, split)
    train_set, info = load_dataset(dataset, split)
    images, labels = train_set.tensors()
    images = images * 2 - 1  # the UNet works in [-1, 1]
    unet, scheduler = build_prior_unet(info.num_classes), build_prior_scheduler()
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    warmup = min(100, steps // 10)
    lr_at = lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    # Small geometric jitter: the digits are few (1,797), the prior should not memorise their exact placement
    # (the 30k Fashion-MNIST images of a half need none: --jitter-copies 0).
    # A pool of jittered copies is drawn once (per-image affine calls would dominate a CPU step).
    jitter = v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1), fill=-1.0)
    pool = torch.cat([images] + [torch.stack([jitter(img) for img in images]) for _ in range(jitter_copies)])
    pool_labels = labels.repeat(jitter_copies + 1)
    start, losses = time.time(), []
    for step in range(steps):
        idx = torch.randint(0, len(pool), (batch_size,))
        x0 = pool[idx]
        y = pool_labels[idx].clone()
        y[torch.rand(batch_size) < label_dropout] = NULL_CLASS
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        update_ema(ema, unet, ema_decay if step > warmup else 0.0)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("step %d/%d  loss %.4f  %.2f s/step", step + 1, steps, sum(losses[-100:]) / 100,
                     (time.time() - start) / (step + 1))
    if data_record["dataset"] == "digits":
        data = "scikit-learn load_digits (1,797 UCI 8x8 digits), bilinear 8->20 px, padded to 28x28; no MNIST"
    else:
        data = f"{data_record['dataset']} split {split}: {len(images)} images"
    provenance = {
        "data": data, **{k: v for k, v in data_record.items() if k != "dataset"}, "train_images": len(images),
        "augmentation": f"RandomAffine(degrees=10, translate=0.08, scale=0.9-1.1), {jitter_copies} jittered copies"
                        " + originals" if jitter_copies else "none",
        "steps": steps, "batch_size": batch_size, "lr": lr, "optimizer": "AdamW wd=1e-4, warmup + cosine",
        "ema_decay": ema_decay, "label_dropout": label_dropout, "null_class": NULL_CLASS, "seed": seed,
        "final_loss_last100": sum(losses[-100:]) / max(len(losses[-100:]), 1),
        "train_seconds": round(time.time() - start, 1), "threads": torch.get_num_threads(), **machine_record(),
        "parameters": sum(p.numel() for p in unet.parameters()), "class_names": list(info.class_names),
        "dataset": data_record["dataset"],
    }
    return ema, scheduler, provenance


def save_prior(unet: UNet2DModel, scheduler: DDPMScheduler, provenance: dict, out: Path) -> None:
    with atomic_dir(out) as tmp:
        unet.save_pretrained(tmp / "unet")
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


@torch.no_grad()
def write_prior_grid(folder: Path, per_class: int = 10, steps: int = 25, guidance_scale: float = 2.0) -> None:
    """What the prior knows before any teacher steers it: unguided DDIM samples, one row per class."""
    from engine.outputs import save_class_grid
    from engine.sampler import GuidanceConfig, GuidedSampler, TeacherView
    from models.convnet import convnet
    from models.priors import load_prior

    provenance = json.loads((folder / "provenance.json").read_text())
    classes = provenance["class_names"]
    prior = load_prior(str(folder), classes)
    unguided = GuidanceConfig(bn=0, cls=0, adv=0, steps=steps, guidance_scale=guidance_scale)
    view = TeacherView(prior.image_size, prior.image_channels, (0.0,), (1.0,))
    sampler = GuidedSampler(prior, convnet(8)(len(classes), prior.image_channels), view, len(classes), unguided)
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    images, _, _ = sampler.sample(labels, torch.arange(len(labels)))
    save_class_grid(images, labels, len(classes), folder / "samples.png", per_class=per_class)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="digits", help="the prior's data (never the teacher's)")
    parser.add_argument("--split", default="all", help="its split (fashion-mnist: half-b, the half no teacher saw)")
    parser.add_argument("--jitter-copies", type=int, default=16, help="randomly shifted/rotated copies per image")
    parser.add_argument("--out", type=Path, default=Path("models/weights/prior-digits"))
    parser.add_argument("--grid-only", action="store_true", help="only (re)draw samples.png of an existing prior")
    args = parser.parse_args(argv)
    setup_logging()
    if args.grid_only:
        write_prior_grid(args.out)
        return 0
    unet, scheduler, provenance = train_prior(args.steps, args.batch_size, seed=args.seed,
                                              jitter_copies=args.jitter_copies, dataset=args.dataset, split=args.split)
    provenance["command"] = (f"python -m engine.train_prior --steps {args.steps} --batch-size {args.batch_size} "
                             f"--seed {args.seed}")
    if args.dataset != "digits":
        provenance["command"] += (f" --dataset {args.dataset} --split {args.split} --jitter-copies "
                                  f"{args.jitter_copies} --out {args.out}")
    save_prior(unet, scheduler, provenance, args.out)
    write_prior_grid(args.out)
    log.info("saved the prior to %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
