"""``python -m benchmarks.bn_sweep``: what the BN-statistics weight α does to guided images, and how far each
method's images sit from the teacher's BatchNorm statistics (issue 16, lever 4).

For the same seeds and classes on the digits world, guided synthesis (the engine's defaults, CutMix off, no L_adv)
at each ``--bn`` value: teacher agreement with the target class and the BN-statistics distance
(``benchmarks.guidance``'s metrics), plus a grid of the images (one row per α, ``bn_sweep.png``). ``--buffers``
scores the replay buffers of finished engine runs (their ``checkpoint.pt``: a DeepInversion or DM-KD run, say) with
the same metrics, on their first and last ``--images`` images, and adds the teacher's predicted-class histogram:

    python -m benchmarks.bn_sweep --images 100 --steps 15 --bn 0.1 0.3 1 3 \\
        --buffers runs/deepinv runs/dmkd        # -> benchmarks/results/bn_sweep.json, bn_sweep.png

``--world fashion`` does the same with the fashion teacher and prior (-> ``bn_sweep_fashion.json``, ``.png``).
The reference rows (real MNIST test images, raw scikit-learn digits) are ``benchmarks.guidance``'s.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, run_metadata, write_results
from benchmarks.guidance import default_teacher, mode_config, run_mode, set_metrics, teacher_logits
from engine.checkpoints import atomic_path
from engine.config import WORLDS, RunConfig
from engine.datasets import as_tensors
from engine.errors import UserError, exits_cleanly
from engine.sampler import TeacherView
from engine.world import load_run_prior

log = logging.getLogger("benchmarks.bn_sweep")


def read_buffer(run_dir: Path) -> dict[str, torch.Tensor]:
    """The replay buffer of a run's ``checkpoint.pt`` (rank 0): uint8 images, cached logits, label weights."""
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        raise UserError(f"{path} does not exist; --buffers takes run directories that kept their checkpoint.pt")
    buffer = torch.load(path, map_location="cpu", weights_only=False)["ranks"][0]["buffer"]
    return {"images": buffer["images"].float() / 255, "targets": buffer["targets"]}


def buffer_metrics(teacher, view: TeacherView, buffer: dict, count: int, batch: int) -> dict:
    """``set_metrics`` of the first and the last ``count`` images of a buffer, with the teacher's predicted-class
    histogram over the whole buffer (does it cover the classes, whatever the targets say?)."""
    images, targets = buffer["images"], buffer["targets"]
    n = len(images)
    logits = teacher_logits(teacher, view, images, batch)  # once; the parts below are slices of it
    predicted = logits.argmax(1)
    row = {"images_in_buffer": n, "predicted_class_histogram": torch.bincount(predicted).tolist(),
           "agreement_whole_buffer": round((predicted == targets.argmax(1)).float().mean().item(), 4)}
    for name, part in (("first", slice(0, count)), ("last", slice(max(0, n - count), n))):
        row[name] = set_metrics(teacher, view, images[part], logits[part], targets[part], batch)
    return row


def save_rows(rows: dict[str, torch.Tensor], path: Path, per_row: int = 20, upscale: int = 2) -> None:
    from torchvision.utils import make_grid, save_image

    grid = make_grid(torch.cat([images[:per_row] for images in rows.values()]), nrow=per_row, padding=2,
                     pad_value=0.5)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=upscale, mode="nearest")[0]
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bn_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--bn", type=float, nargs="*", default=[0.1, 0.3, 1.0, 3.0], help="α values to sweep")
    parser.add_argument("--world", choices=list(WORLDS), default="digits", help="embedded world (teacher, prior)")
    parser.add_argument("--first-bn", type=float, nargs="+", default=[1.0],
                        help="first-BN-layer multipliers to sweep with every α (DeepInversion uses 10)")
    parser.add_argument("--images", type=int, default=100, help="images per α (classes balanced)")
    parser.add_argument("--steps", type=int, default=15, help="sampler steps, every one guided (15: the committed "
                        "screens; the digits run samples 25, guiding every 2nd)")
    parser.add_argument("--batch", type=int, default=RunConfig().gen_batch, help="generation and BN-metric batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--buffers", type=Path, nargs="*", default=[], help="finished run directories to score")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where bn_sweep.json and the PNG go")
    return parser


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device, test_set, info, _, teacher, view = default_teacher(args)
    results, grids = {"guided": {}, "buffers": {}}, {}
    if args.bn:
        prior = load_run_prior(mode_config(args, {}), info, device)
    for alpha, first in itertools.product(args.bn, args.first_bn):
        name = f"bn={alpha:g}" + (f",first={first:g}" if args.first_bn != [1.0] else "")
        out = run_mode(mode_config(args, {"use_cutmix": False, "bn": alpha, "first_bn_multiplier": first}), prior,
                       teacher, view, info.num_classes, device)
        grids[name] = out["images"]
        results["guided"][name] = set_metrics(teacher, view, out["images"].to(device), out["logits"],
                                              out["weights"], args.batch) | {
            "bn": alpha, "first_bn_multiplier": first, "images_per_s": round(out["images_per_s"], 3)}
        log.info("%s: %s", name, results["guided"][name])
    for run_dir in args.buffers:
        results["buffers"][str(run_dir)] = buffer_metrics(teacher, view, read_buffer(run_dir), args.images,
                                                          args.batch)
        log.info("%s: %s", run_dir, results["buffers"][str(run_dir)])
    images, labels = as_tensors(test_set, args.images)
    images = images.to(device)
    real = "real_mnist" if args.world == "digits" else f"real_{info.name}"
    results[real] = set_metrics(teacher, view, images, teacher_logits(teacher, view, images, args.batch), labels,
                                args.batch)
    results["settings"] = {"world": args.world, "images": args.images, "steps": args.steps, "batch": args.batch,
                           "seed": args.seed, "cutmix": False, "adv": False}
    stem = "bn_sweep" if args.world == "digits" else f"bn_sweep_{args.world}"
    path = write_results(results | run_metadata("benchmarks.bn_sweep", argv), args.out_dir / f"{stem}.json")
    if grids:
        save_rows(grids, args.out_dir / f"{stem}.png")
    rows = {**results["guided"], real: results[real],
            **{f"{k} ({part})": v[part] for k, v in results["buffers"].items() for part in ("first", "last")}}
    print(f"{'set':<48}{'agreement':>11}{'bn_distance':>13}")
    print("\n".join(f"{name:<48}{r['teacher_agreement']:>11.3f}{r['bn_distance']:>13.1f}" for name, r in rows.items()))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
