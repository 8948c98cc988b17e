"""The work a run of each method does, counted (issue 13: compute-matched comparisons).

    python -m benchmarks.compute [--extra FLAGS...]      # prints a JSON object, one entry per method

For a method's resolved config (the engine's own world, weights and code; CPU), counted with torch's
FlopCounterMode (matmuls and convolutions, forward and backward):

    gen_flops_per_image   one whole micro-batch from noise to cached teacher logits, divided by its size: every
                          sampler step (CFG, the latent gradient through UNet and decoder, ε̂ recomputed, CutMix and
                          repair), or every DeepInversion iteration, with L_adv on against a student, as after the
                          warm-up; for real-data KD the teacher's logits on the real image
    kd_flops_per_step     one student update (teacher on the augmented view, KL + mSARC, backward)
    prior_forwards_per_image   gen_flops_per_image in units of one single-branch prior forward on one image

``run_flops(cost, images, student_steps)`` is the run's total; ``images_at_equal_compute`` solves for the image count
that gives another method the same total at the same student steps.

Counting synthesizes a micro-batch per method (minutes for a whole table on a busy 2-core CPU), so the benchmarks
keep the counts in ``runs/compute-cache.json``, keyed by the resolved config and a fingerprint of the counted code
(engine/ but its config, models/ with the embedded weights, losses/, augment/, this file, the torch version) and of
the bytes of a user's own local --teacher / --prior / --guidance-decoder-path: a cached count is reused only while
none of it has changed. ``--no-cache`` counts afresh.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
from functools import cache
from pathlib import Path

import torch

from benchmarks.flops import counted
from engine.checkpoints import atomic_write_json
from engine.config import parse_config
from engine.loop import micro_batch, student_step
from engine.replay_buffer import ReplayBuffer
from engine.run import make_accelerator
from engine.world import build_world
from losses import WeightedSum

METHOD_FLAGS = {
    "real-kd": ["--method", "real-kd"],
    "deepinv": ["--method", "deepinv"],
    "dmkd": ["--method", "dmkd"],
    "diffdfkd-offline": ["--method", "diffdfkd", "--schedule", "offline"],
    "ours-online": ["--method", "diffdfkd", "--schedule", "online"],
}


CACHE = Path("runs/compute-cache.json")
ROOT = Path(__file__).resolve().parent.parent
COUNTED_CODE = ("engine", "models", "losses", "augment", "benchmarks/compute.py", "benchmarks/flops.py")
# Whatever engine/config.py decides (a world's defaults, resolution) is in the resolved config the key is made from:
# a new default changes the key only where it changes the run.
NOT_COUNTED = {Path("engine/config.py")}


def file_sha256(path: Path) -> bytes:
    """sha256 of a file's bytes, streamed (a Stable Diffusion folder holds GBs) and computed once per process while
    the file keeps its size and modification time (a table asks for the same models' fingerprint once per method)."""
    stat = path.stat()
    return _file_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


@cache
def _file_sha256(path: Path, size: int, mtime_ns: int) -> bytes:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").digest()


def digest_files(digest, paths, root: Path) -> None:
    """Feed ``digest`` each existing file of ``paths``: its path relative to ``root``, then its bytes' sha256."""
    for path in paths:
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(file_sha256(path))


def files_under(top: Path) -> list[Path]:
    """A folder's files and folders, sorted (a stable order for a digest); a file alone."""
    return sorted(top.rglob("*")) if top.is_dir() else [top]


@cache
def code_fingerprint() -> str:
    """sha256 over the files whose change can change a count (paths and bytes) and the torch version."""
    digest = hashlib.sha256(torch.__version__.encode())
    for part in COUNTED_CODE:
        digest_files(digest, [path for path in files_under(ROOT / part) if "__pycache__" not in path.parts
                              and path.relative_to(ROOT) not in NOT_COUNTED], ROOT)
    return digest.hexdigest()


# Config fields that may name a user's local model file or folder; a new model saved at the same path is another model.
MODEL_PATH_FIELDS = ("teacher", "prior", "guidance_decoder_path")


def model_files_fingerprint(cfg) -> str:
    """sha256 over the bytes of every local file the model fields of ``cfg`` name (a checkpoint with its JSON sidecar,
    or a diffusers folder); names of embedded models and hub ids add nothing (embedded weights are counted code)."""
    digest = hashlib.sha256()
    for name in MODEL_PATH_FIELDS:
        value = getattr(cfg, name)
        if not value or not Path(value).exists():
            continue
        top = Path(value)
        digest.update(name.encode())
        if top.is_dir():
            digest_files(digest, files_under(top), top)
        else:
            digest_files(digest, [top, top.with_suffix(".json")], top.parent)
    return digest.hexdigest()


def method_cost(flags: list[str], cache_path: Path | None = CACHE) -> dict:
    """FLOPs per generated image and per student step for the engine run that ``flags`` describe; a count already in
    ``cache_path`` for the same resolved config, counted code and model files is read back (``None``: always count)."""
    cfg = parse_config(["--device", "cpu", *flags]).resolved()
    fingerprint = cfg.to_json() + code_fingerprint() + model_files_fingerprint(cfg)
    key = hashlib.sha256(fingerprint.encode()).hexdigest()
    cached = json.loads(cache_path.read_text()) if cache_path is not None and cache_path.exists() else {}
    if key not in cached:
        cached[key] = count_cost(cfg)
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cached, cache_path)
    return cached[key]


def count_cost(cfg) -> dict:
    """Count what :func:`method_cost` returns, for a resolved config."""
    torch.manual_seed(0)
    world = build_world(cfg, torch.device("cpu"))
    teacher, view, generator = world.teacher.model, world.view, world.generator
    labels, seeds = micro_batch(cfg, 0, world.info.num_classes)
    student = copy.deepcopy(world.student).eval().requires_grad_(False)  # the generator's snapshot
    cost = {}
    if generator is None:  # real-data KD: the teacher labels each real image once
        images = torch.rand(len(labels), view.channels, view.size, view.size)
        with torch.no_grad():
            cost["gen_flops_per_image"] = counted(lambda: teacher(view.normalize(images))) / len(labels)
    else:
        if cfg.adv > 0:
            generator.set_weights(adv=cfg.adv)

        def synthesize():
            batch = generator.start(labels, seeds)
            while not batch.done:
                generator.step(batch, student)
            return generator.finish(batch)

        made = []
        cost["gen_flops_per_image"] = counted(lambda: made.append(synthesize()[0])) / len(labels)
        images = made[0]
        if world.prior is not None:
            prior = world.prior
            z = torch.randn(len(labels), *prior.latent_shape)
            cond = prior.condition(labels)
            with torch.no_grad():
                single = counted(lambda: prior.predict_noise(z, prior.scheduler.timesteps[0], cond, 1.0))
            cost["prior_forwards_per_image"] = cost["gen_flops_per_image"] / (single / len(labels))
    buffer = ReplayBuffer(len(labels), tuple(images.shape[1:]), world.info.num_classes)
    with torch.no_grad():
        logits = teacher(view.normalize(images))
    buffer.add(images, logits, torch.nn.functional.one_hot(labels, world.info.num_classes).float(), seeds)
    optimizer = torch.optim.AdamW(world.student.parameters(), lr=cfg.lr)
    kd_loss = WeightedSum({"kl": 1.0, "msarc": cfg.msarc}, name="L_kd")
    accelerator = make_accelerator("cpu", "no")
    cost["kd_flops_per_step"] = counted(lambda: student_step(
        cfg, world.student, world.student, teacher, view, buffer, optimizer, accelerator, kd_loss,
        torch.Generator().manual_seed(0)))
    return cost


def run_flops(cost: dict, images: int, student_steps: int) -> float:
    return images * cost["gen_flops_per_image"] + student_steps * cost["kd_flops_per_step"]


def cost_row(cost: dict, images: int, student_steps: int) -> dict:
    """A table row's counted work: the per-image and per-step counts with the run's total."""
    return cost | {"total_flops": run_flops(cost, images, student_steps)}


def images_at_equal_compute(cost: dict, total_flops: float, student_steps: int) -> int:
    """Images whose synthesis, with ``student_steps`` KD steps, costs ``total_flops``."""
    return max(1, int((total_flops - student_steps * cost["kd_flops_per_step"]) // cost["gen_flops_per_image"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHOD_FLAGS), default=list(METHOD_FLAGS))
    parser.add_argument("--no-cache", action="store_true", help=f"count afresh, without reading or writing {CACHE}")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="engine flags for every method")
    args = parser.parse_args(argv)
    cache_path = None if args.no_cache else CACHE
    print(json.dumps({name: method_cost([*METHOD_FLAGS[name], *args.extra], cache_path) for name in args.methods},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
