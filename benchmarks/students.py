"""Which student learns from a fixed synthetic set? A finished run's replay buffer (its ``checkpoint.pt``) is
distilled into several student architectures with the engine's own KD step (``engine.loop.student_step``: KL +
mSARC, AdamW, cosine schedule, the run's crop augmentation), so only the student differs.

    python -m benchmarks.students --run runs/default --students convnet-w16 convnet2-w8 convnet2-w16 --steps 1000

This is how the default student was chosen: on the same images a student whose receptive field is too small for
the digit before global pooling (``convnet-w16``) learns the synthetic strokes' texture and transfers poorly to
real digits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, run_metadata, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/default"), help="a finished run directory")
    parser.add_argument("--students", nargs="+", default=["convnet-w16", "convnet2-w8", "convnet2-w16"])
    parser.add_argument("--steps", type=int, default=1000, help="student steps (cosine schedule over them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "students.json")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    from engine.config import RunConfig
    from engine.evaluate import accuracy
    from engine.loop import cosine_schedule, set_seed, student_step
    from engine.replay_buffer import ReplayBuffer
    from engine.world import build_world
    from losses import WeightedSum
    from models.base import count_parameters

    run_cfg = json.loads((args.run / "config.json").read_text())
    checkpoint = torch.load(args.run / "checkpoint.pt", map_location="cpu", weights_only=False)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    base = RunConfig(**{k: v for k, v in run_cfg.items() if k in fields})
    results = {"run": str(args.run), "steps": args.steps, "students": {}}
    buffer = None
    for arch in args.students:
        set_seed(args.seed)
        cfg = dataclasses.replace(base, method="real-kd", student=arch, student_steps=args.steps, resume=False)
        world = build_world(cfg, torch.device("cpu"))  # real-kd: teacher, student and test set, no prior
        if buffer is None:  # the same images for every student (sampling reads it, never writes)
            buffer = ReplayBuffer.from_state_dicts([r["buffer"] for r in checkpoint["ranks"]], world.info.num_classes)
        student = world.student
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        schedule = cosine_schedule(optimizer, cfg.student_steps)
        kd_loss = WeightedSum({"kl": 1.0, "msarc": cfg.msarc}, name="L_kd")
        generator = torch.Generator().manual_seed(args.seed + 1)
        accelerator, curve = Accelerator(cpu=True), {}
        for step in range(1, cfg.student_steps + 1):
            student_step(cfg, student, student, world.teacher.model, world.view, buffer, optimizer,
                         accelerator, kd_loss, generator)
            schedule.step()
            if step % 250 == 0 or step == cfg.student_steps:
                curve[step] = accuracy(student, world.test_set, world.info, mean=world.teacher.mean,
                                       std=world.teacher.std)
        results["students"][arch] = {"parameters": count_parameters(student), "student_acc": curve[args.steps],
                                     "curve": curve}
        print(f"{arch:14s} {count_parameters(student):7d} params  {100 * curve[args.steps]:.2f}%", flush=True)
    results["images"] = len(buffer)
    write_results(results | run_metadata("benchmarks.students", argv), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
