"""``python -m engine.synthesize``: an offline synthetic set from the guided sampler, written as an ImageFolder.

    python -m engine.synthesize --images 2000 --out synthetic/mnist              # the default world
    python -m engine.synthesize --images 500 --out synthetic/dmkd --method dmkd  # unguided prior samples (DM-KD)
    python -m engine.synthesize --prior path/to/sd --teacher teacher.safetensors --dataset cifar10 --images 100 \\
        --out synthetic/cifar

The synthesis flags are the ``engine.run`` flags of the same name (generated from ``RunConfig``, so both commands
share one set of defaults); ``--batch`` is ``engine.run``'s ``--gen-batch``. Classes are balanced round-robin and each
image has its own seed derived from ``--seed`` exactly as ``engine.run`` derives them, so image ``i`` here is the
image ``i`` an offline run with the same flags would generate.

Output (built in a temp folder beside OUT and renamed into place at the end, so OUT is complete or absent):

    OUT/<class>/<index>.png   images at the teacher's resolution and channels; the folder is the dominant class
    OUT/labels.pt             files, targets (N, K) label weights (soft after a CutMix), teacher_logits, seeds,
                              class_names
    OUT/grid.png              the first 10 images of each class, one row per class
    OUT/synthesis.json        the resolved flags, teacher, prior, images/s
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoints import atomic_dir, atomic_write_json
from engine.config import HelpFormatter, RunConfig, add_config_flags, apply_world_defaults
from engine.datasets import load_dataset
from engine.errors import UserError, exits_cleanly
from engine.logs import setup_logging
from engine.loop import micro_batch
from engine.outputs import export_image_folder, save_class_grid
from engine.sampler import GuidedSampler
from engine.world import guided_sampler, load_teacher

log = logging.getLogger("engine.synthesize")

# The RunConfig fields that concern synthesis; adv is left out (there is no student to be adversarial to).
SYNTHESIS_FIELDS = (
    "images", "seed", "method", "world", "teacher", "teacher_arch", "prior", "dataset", "data_root", "class_map",
    "prompt_template", "class_free_prompt", "bn", "cls", "cls_boundary", "step_size", "guidance_scale",
    "sampler_steps", "scheduler", "grad_mode", "reuse_eps", "guide_every", "max_step_rms", "first_bn_multiplier",
    "cutmix_every", "cutmix_beta", "cutmix_prob",
    "repair_steps", "repair_band", "gen_batch", "grad_chunk", "grad_checkpointing", "use_bn", "use_cls", "use_cutmix",
    "use_inpaint", "device", "overwrite",
)
FLAG_NAMES = {"gen_batch": "--batch"}
METHODS = ("diffdfkd", "dmkd")  # the prior-based methods; deepinv and real-kd have no prior to sample


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.synthesize",
        description="Synthesize a labelled image set with a teacher-guided diffusion prior (SPEC §2).",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (refused if it exists; see --overwrite)")
    add_config_flags(parser, SYNTHESIS_FIELDS, renamed=FLAG_NAMES, choices={"method": METHODS},
                     help={"overwrite": "replace an existing --out folder"})
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[RunConfig, Path]:
    """Flags -> (resolved RunConfig with the method presets and ablation toggles applied, output folder)."""
    parser = build_parser()
    apply_world_defaults(parser, argv)
    values = vars(parser.parse_args(argv))
    out = values.pop("out")
    return RunConfig(**values, adv=0.0, use_adv=False).resolved(), out


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to replace earlier output unless asked, or a folder that cannot be made; writes nothing, so a bad flag
    leaves the disk untouched."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot create {out} ({ancestor} is not a writable folder); pass a writable --out")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available here; use --device cpu (or auto)")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device '{spec}' is not a device; use auto, cpu, cuda or cuda:N") from None


@dataclass
class SyntheticSet:
    """Finished images with their labels, in the shape ``export_image_folder`` reads (like a ReplayBuffer)."""

    images: torch.Tensor  # (N, C, H, W) in [0, 1], teacher resolution
    logits: torch.Tensor  # (N, K) the teacher's logits on the images
    targets: torch.Tensor  # (N, K) label weights
    seeds: torch.Tensor  # (N,)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images, self.logits, self.targets, self.seeds


def build_sampler(cfg: RunConfig, device: torch.device) -> tuple[GuidedSampler, dict]:
    """Teacher, view and prior as ``engine.run`` builds them (minus the student and the real test set)."""
    split = "all" if cfg.dataset == "digits" else "test"  # only the class names and normalisation are needed
    _, info = load_dataset(cfg.dataset, split, root=cfg.data_root or None)
    teacher, view = load_teacher(cfg, info, device)
    sampler = guided_sampler(cfg, info, teacher, view, device)
    prior = sampler.prior
    about = {"teacher_checkpoint": teacher.checkpoint, "teacher_arch": teacher.arch, "prior": prior.source,
             "prior_kind": prior.kind, "class_names": list(info.class_names)}
    return sampler, about


def synthesize(cfg: RunConfig, sampler: GuidedSampler, num_classes: int) -> tuple[SyntheticSet, dict]:
    """Generate ``cfg.images`` images in micro-batches of ``cfg.gen_batch``; returns the set and timing stats."""
    images, logits, targets, seeds = [], [], [], []
    skipped = 0
    n_batches = math.ceil(cfg.images / cfg.gen_batch)
    start = time.perf_counter()
    for index in range(n_batches):
        labels, batch_seeds = micro_batch(cfg, index, num_classes)
        batch_images, batch_logits, batch = sampler.sample(labels, batch_seeds)
        images.append(batch_images.cpu())
        logits.append(batch_logits.float().cpu())
        targets.append(batch.label_weights.cpu())
        seeds.append(batch.seeds)
        skipped += int(batch.skipped)  # a host sync once per finished micro-batch
        done = sum(len(x) for x in images)
        log.info("batch %d/%d: %d/%d images, %.2f images/s", index + 1, n_batches, done, cfg.images,
                 done / (time.perf_counter() - start))
    seconds = time.perf_counter() - start
    synthetic = SyntheticSet(torch.cat(images), torch.cat(logits), torch.cat(targets), torch.cat(seeds))
    stats = {"seconds": round(seconds, 3), "images_per_s": round(len(synthetic.images) / seconds, 3),
             "skipped_latent_steps": skipped}
    return synthetic, stats


def write_output(out: Path, synthetic: SyntheticSet, class_names: list[str], provenance: dict) -> None:
    """The ImageFolder, labels.pt, grid.png and synthesis.json, built beside ``out`` and renamed into place."""
    with atomic_dir(out) as tmp:
        export_image_folder(synthetic, class_names, tmp)  # atomic on its own; here it fills our temp folder
        save_class_grid(synthetic.images, synthetic.targets.argmax(1), len(class_names), tmp / "grid.png")
        atomic_write_json(provenance, tmp / "synthesis.json")


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    cfg, out = parse_args(argv)
    check_out_dir(out, cfg.overwrite)
    setup_logging()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    sampler, about = build_sampler(cfg, device)  # all user errors surface here, before any work
    log.info("synthesis on %s: %d images, %s, %d %s steps", device, cfg.images, sampler.weighted.formula(),
             cfg.sampler_steps, cfg.scheduler)
    synthetic, stats = synthesize(cfg, sampler, len(about["class_names"]))
    provenance = {
        "command": "python -m engine.synthesize " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {name: getattr(cfg, name) for name in SYNTHESIS_FIELDS} | {"adv": 0.0},
        "guidance": dataclasses.asdict(sampler.config), "device": str(device), **about, **stats,
    }
    write_output(out, synthetic, about["class_names"], provenance)
    log.info("%d images in %.1f s (%.2f images/s, %d latent steps skipped) -> %s", len(synthetic.images),
             stats["seconds"], stats["images_per_s"], stats["skipped_latent_steps"], out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
