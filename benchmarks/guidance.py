"""``python -m benchmarks.guidance``: does teacher guidance move prior samples toward the teacher's domain?

For the SAME seeds and classes on the default world (the committed digits prior, the MNIST teacher):

    unguided        α = β = γ = 0, CFG 2 (DM-KD-style prior samples)
    guided          the RunConfig defaults (α·L_bn + β·L_cls, per-sample step η), CutMix off
    guided+cutmix   the RunConfig defaults with Latent CutMix + seam repair

and two reference rows: the first N real MNIST test images and the first N raw scikit-learn digits (the prior's own
training data, made 28 px). Metrics (SPEC §8):

    teacher_agreement  fraction of images the teacher classifies as their target class (for a CutMix sample, the
                       dominant class of its mixed label; for the reference rows, the true label)
    bn_distance        DeepInversion's L_bn of the images in the teacher's normalised space (losses.bn_stat_distance),
                       per batch of the generation batch size, mean over batches (it depends on the batch size)
    images_per_s       synthesis throughput, wall clock: prior, guidance, decoding and the teacher's logits

Writes ``benchmarks/results/guidance.json`` and ``benchmarks/results/guidance_samples.png`` (rows = classes, left
block unguided, right block guided, the same seeds in the same columns).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, run_metadata, timed, write_results
from engine.checkpoints import atomic_path
from engine.classifiers import DEFAULT_PRIOR, PRETRAINED, WEIGHTS_DIR, resolve_classifier
from engine.config import WORLDS, RunConfig
from engine.datasets import as_tensors, load_dataset
from engine.errors import UserError, exits_cleanly
from engine.logs import setup_logging
from engine.loop import micro_batch
from engine.sampler import GuidedSampler, TeacherView
from engine.synthesize import resolve_device
from engine.world import guidance_config, load_run_prior
from losses import bn_stat_distance

log = logging.getLogger("benchmarks.guidance")

# RunConfig overrides per mode; everything else is the engine's default.
MODES = {
    "unguided": {"bn": 0.0, "cls": 0.0, "use_cutmix": False, "guidance_scale": 2.0},
    "guided": {"use_cutmix": False},
    "guided+cutmix": {},
}


def build_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guidance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--images", type=int, default=200, help="images per mode (classes balanced)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps")
    parser.add_argument("--batch", type=int, default=defaults.gen_batch, help="generation (and BN-metric) batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where guidance.json and the PNG go")
    return parser


def world_of(args: argparse.Namespace) -> str:
    """The embedded world a benchmark's flags name (``--world`` where the benchmark has it; digits otherwise)."""
    return getattr(args, "world", "digits")


def mode_config(args: argparse.Namespace, overrides: dict) -> RunConfig:
    world = world_of(args)
    presets = {k: v for k, v in WORLDS[world].items() if k in ("teacher", "prior", "dataset", "student")}
    # Every step guided, whatever the world's run does (the digits run guides every 2nd): the screens measure guidance.
    return RunConfig(images=args.images, gen_batch=args.batch, seed=args.seed, sampler_steps=args.steps, guide_every=1,
                     adv=0.0, use_adv=False, world=world, **presets | overrides).resolved()


def check_default_world() -> None:
    teacher = WEIGHTS_DIR / f"{PRETRAINED['default']}.safetensors"
    if not teacher.exists():
        raise UserError(f"the default teacher is missing ({teacher}); run: python -m engine.train_teacher")
    if not (DEFAULT_PRIOR / "unet").is_dir():
        raise UserError(f"the default prior is missing ({DEFAULT_PRIOR}); run: python -m engine.train_prior")


def default_teacher(args: argparse.Namespace):
    """Check ``--images/--steps/--batch``, set up logging, and load the world (``args.world``, digits unless set):
    the device, its real test set, its info, the teacher's spec, the frozen teacher and its input view (guidance
    and bn_sweep share it)."""
    if args.images <= 0 or args.steps <= 0 or args.batch <= 0:
        raise UserError("--images, --steps and --batch must be positive")
    name = world_of(args)
    if name == "digits":
        check_default_world()
    world = WORLDS[name]
    setup_logging()
    device = resolve_device(args.device)
    test_set, info = load_dataset(world["dataset"], "test")
    spec = resolve_classifier(world["teacher"], info)
    teacher = spec.model.to(device).eval().requires_grad_(False)
    view = TeacherView(spec.provenance.get("image_size", info.image_size),
                       spec.provenance.get("in_channels", info.channels), spec.mean, spec.std).to(device)
    return device, test_set, info, spec, teacher, view


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, view: TeacherView, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([teacher(view(images[i:i + batch])) for i in range(0, len(images), batch)])


def set_metrics(teacher, view: TeacherView, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                batch: int) -> dict:
    """Agreement over the whole set; the BN distance per batch of ``batch`` images, averaged over batches.

    ``targets``: class ids (N,) or label weights (N, K); for soft (CutMix) labels the target class is the dominant
    one, and ``agreement_any_mixed_class`` counts the teacher's class when it is any class the sample was mixed from.
    """
    distances = [bn_stat_distance(teacher, view(images[i:i + batch])) for i in range(0, len(images), batch)]
    predicted, targets = logits.argmax(1).cpu(), targets.cpu()
    metrics = {}
    if targets.dim() == 2:
        any_class = (targets.gather(1, predicted[:, None]) > 0).float().mean().item()
        metrics = {"agreement_any_mixed_class": round(any_class, 4),
                   "mixed_fraction": round((targets.max(1).values < 1).float().mean().item(), 4)}
        targets = targets.argmax(1)
    return {"teacher_agreement": round((predicted == targets).float().mean().item(), 4),
            "bn_distance": round(sum(distances) / len(distances), 3), "images": len(images)} | metrics


def run_mode(cfg: RunConfig, prior, teacher, view: TeacherView, num_classes: int, device) -> dict:
    """The mode's synthetic set, batch by batch as engine.synthesize makes it, timed."""
    sampler = GuidedSampler(prior, teacher, view, num_classes, guidance_config(cfg))
    log.info("%d images, %d steps, CFG %g, %s, CutMix every %d (repair %d)", cfg.images, cfg.sampler_steps,
             cfg.guidance_scale, sampler.weighted.formula(), cfg.cutmix_every, cfg.repair_steps)
    images, logits, targets, skipped, clock = [], [], [], 0, {}
    for index in range(math.ceil(cfg.images / cfg.gen_batch)):
        labels, seeds = micro_batch(cfg, index, num_classes)
        with timed(device, clock):
            batch_images, batch_logits, batch = sampler.sample(labels, seeds)
        images.append(batch_images.cpu())
        logits.append(batch_logits.float().cpu())
        targets.append(batch.label_weights.cpu())  # soft after a CutMix
        skipped += int(batch.skipped)
    n = sum(len(x) for x in images)
    return {"images": torch.cat(images), "logits": torch.cat(logits), "weights": torch.cat(targets),
            "seconds": clock["seconds"], "images_per_s": n / clock["seconds"], "skipped_latent_steps": skipped,
            "formula": sampler.weighted.formula(), "guidance": dataclasses.asdict(sampler.config)}


def save_side_by_side(left: torch.Tensor, right: torch.Tensor, labels: torch.Tensor, num_classes: int, path,
                      per_class: int = 8, upscale: int = 2) -> None:
    """Rows = classes; ``per_class`` images of ``left``, a blank column, the same indices of ``right``."""
    from torchvision.utils import make_grid, save_image

    c, h, w = left.shape[1:]
    cells = []
    for k in range(num_classes):
        index = (labels == k).nonzero().flatten()[:per_class]
        for block in (left, right):
            row = torch.zeros(per_class, c, h, w)
            row[: len(index)] = block[index]
            cells.append(row)
            if block is left:
                cells.append(torch.ones(1, c, h, w) * 0.5)  # grey separator
    grid = make_grid(torch.cat(cells), nrow=2 * per_class + 1, padding=2, pad_value=0.25)
    grid = F.interpolate(grid[None], scale_factor=upscale, mode="nearest")[0]
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device, test_set, info, teacher_spec, teacher, view = default_teacher(args)
    prior = load_run_prior(RunConfig(), info, device)

    results, sets = {}, {}
    for name in args.modes:
        cfg = mode_config(args, MODES[name])
        out = run_mode(cfg, prior, teacher, view, info.num_classes, device)
        sets[name] = out
        results[name] = set_metrics(teacher, view, out["images"].to(device), out["logits"], out["weights"],
                                    args.batch) | {
            "images_per_s": round(out["images_per_s"], 3), "seconds": round(out["seconds"], 2),
            "skipped_latent_steps": out["skipped_latent_steps"], "loss": out["formula"],
            "cutmix_every": out["guidance"]["cutmix_every"], "cutmix_prob": out["guidance"].get("cutmix_prob", 1.0),
            "repair_steps": out["guidance"]["repair_steps"],
            "guidance_scale": out["guidance"]["guidance_scale"]}
        log.info("%s: %s", name, results[name])

    # Reference rows: real MNIST (the teacher's domain) and the prior's own training data.
    digits, _ = load_dataset("digits", "all")
    for name, dataset in (("real_mnist", test_set), ("raw_digits", digits)):
        images, labels = as_tensors(dataset, args.images)
        images = images.to(device)
        logits = teacher_logits(teacher, view, images, args.batch)
        results[name] = set_metrics(teacher, view, images, logits, labels, args.batch) | {"images_per_s": None}
        log.info("%s: %s", name, results[name])

    results["settings"] = {"images": args.images, "steps": args.steps, "batch": args.batch, "seed": args.seed,
                           "device": str(device), "scheduler": RunConfig().scheduler,
                           "teacher": teacher_spec.checkpoint, "prior": str(DEFAULT_PRIOR)}
    results |= run_metadata("benchmarks.guidance", argv)
    path = write_results(results, args.out_dir / "guidance.json")
    if "unguided" in sets and "guided" in sets:
        save_side_by_side(sets["unguided"]["images"], sets["guided"]["images"], sets["guided"]["weights"].argmax(1),
                          info.num_classes, args.out_dir / "guidance_samples.png")
    header = f"{'set':<15}{'agreement':>11}{'bn_distance':>13}{'images/s':>10}"
    rows = [header] + [f"{name:<15}{r['teacher_agreement']:>11.3f}{r['bn_distance']:>13.1f}"
                       f"{(r['images_per_s'] or float('nan')):>10.2f}"
                       for name, r in results.items() if isinstance(r, dict) and "teacher_agreement" in r]
    print("\n".join(rows) + f"\n-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
