"""Which per-class signal, read on the synthetic images, finds the classes where the student disagrees with its
teacher on *real* images? (issue 16, lever 5: what a class focus should read.)

    python -m benchmarks.class_signals --run RUN [RUN ...] [--synthetic DIR ...] --dataset fashion-mnist \
        --teacher fashion --out benchmarks/results/class_signals_fashion.json

Each RUN is a finished run directory made with ``--export`` (``RUN/synthetic/labels.pt`` and its PNGs, and
``RUN/student.safetensors``); each DIR an ``engine.synthesize --out`` folder (no student: the teacher's signals
only). Per class k, over the exported images weighted by their soft targets w_ik (a CutMix image counts for both
its classes), on the images as exported (no augmentation):

* ``kd``: the student's mean distillation loss τ²·KL(p_T^τ ‖ p_S^τ), what ``--class-focus`` reads;
* ``disagreement``: how often the student's top class differs from the teacher's;
* ``teacher_margin``: the teacher's mean top-1 minus top-2 probability (low: the teacher finds the image ambiguous);
* ``teacher_target_prob``: the teacher's mean probability of the image's target class;
* ``teacher_label_agreement``: how often the teacher's top class is the image's (main) label.

Each signal also comes as ``NAME_unmixed``: over the images that no CutMix touched (one-hot targets) alone, since a
mixed image is ambiguous by construction and lowers every teacher signal.

``real_test_teacher`` holds the teacher's own three signals on the real test images, by true class: what the
synthetic images' teacher signals would look like if they were distributed like the real ones.

Beside them, on the real test split (which the method never sees; here only to judge the signals): the student's
per-class disagreement with the teacher. Each signal's Spearman rank correlation with that real disagreement says
how well it would point a class focus at the real weak classes (+1: same order; for the teacher's three signals,
low values should mean hard classes, so their correlation is taken with the sign flipped).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, read_image

from benchmarks.common import run_metadata, write_results
from engine.classifiers import resolve_classifier
from engine.datasets import load_dataset
from engine.evaluate import per_class, predictions
from losses import kd_kl_per_sample

LOW_MEANS_HARD = {"teacher_margin", "teacher_target_prob", "teacher_label_agreement"}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equal-length lists (ties get their mean rank; pairs with a None are left
    out)."""
    kept = [i for i in range(len(a)) if a[i] is not None and b[i] is not None]
    a, b = [a[i] for i in kept], [b[i] for i in kept]

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for m in range(i, j + 1):
                out[order[m]] = (i + j) / 2
            i = j + 1
        return torch.tensor(out)

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / ((ra.square().sum() * rb.square().sum()).sqrt() + 1e-12))


@torch.no_grad()
def synthetic_signals(student, teacher, images: tuple, targets: torch.Tensor, tau: float) -> dict[str, list[float]]:
    """Per class, the target-weighted mean of each signal over the images (a pair of inputs, each normalised for
    its model; ``student`` None: the teacher's signals alone)."""
    student_in, teacher_in = images
    t_logits = teacher(teacher_in)
    t_probs = t_logits.softmax(1)
    top2 = t_probs.topk(2, dim=1).values
    per_sample = {
        "teacher_margin": top2[:, 0] - top2[:, 1],
        "teacher_target_prob": (t_probs * targets).sum(1) / targets.sum(1),
        "teacher_label_agreement": (t_logits.argmax(1) == targets.argmax(1)).float(),
    }
    if student is not None:
        s_logits = student(student_in)
        per_sample["kd"] = kd_kl_per_sample(s_logits, t_logits, tau)
        per_sample["disagreement"] = (s_logits.argmax(1) != t_logits.argmax(1)).float()
    weights = targets.float()
    unmixed = weights * (weights.max(dim=1, keepdim=True).values > 0.999)  # one-hot rows: no CutMix
    out = {}
    for suffix, w in (("", weights), ("_unmixed", unmixed)):
        mass = w.sum(0)
        for name, value in per_sample.items():  # None for a class without images
            out[name + suffix] = [m if n > 0 else None for m, n in zip(((w.T @ value) / mass).tolist(), mass.tolist())]
    return out


def load_export(folder: Path, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (N, C, H, W) in [0, 1] and soft targets (N, K) of an ImageFolder export (``RUN/synthetic`` of
    ``engine.run --export``, or an ``engine.synthesize --out`` folder)."""
    labels = torch.load(folder / "labels.pt", weights_only=True)
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    images = torch.stack([read_image(str(folder / f), mode) for f in labels["files"]]).float() / 255
    return images, labels["targets"].float()


def rounded(values: list) -> list:
    """Per-class values to 4 decimals, a class without images staying None."""
    return [None if v is None else round(v, 4) for v in values]


def normalised(images: torch.Tensor, spec) -> torch.Tensor:
    """``images`` in [0, 1] as the classifier ``spec`` expects them (its mean and std)."""
    return (images - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, nargs="*", default=[], help="finished run directories made with "
                        "--export")
    parser.add_argument("--synthetic", type=Path, nargs="*", default=[], help="engine.synthesize --out folders: the "
                        "teacher's signals alone")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--teacher", default="fashion")
    parser.add_argument("--tau", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/class_signals_fashion.json"))
    args = parser.parse_args(argv)

    test_set, info = load_dataset(args.dataset, "test")
    teacher = resolve_classifier(args.teacher, info)
    teacher.model.eval()
    teacher_preds, labels = predictions(teacher.model, test_set, info, mean=teacher.mean, std=teacher.std)
    real_images = test_set.images.float() / 255  # the teacher's own signals on real images, by true class
    real = synthetic_signals(None, teacher.model, (None, normalised(real_images, teacher)),
                             torch.nn.functional.one_hot(labels, info.num_classes).float(), args.tau)
    rows = []
    for run in args.run:
        student = resolve_classifier(str(run / "student.safetensors"), info)
        student.model.eval()
        images, targets = load_export(run / "synthetic", info.channels)

        inputs = (normalised(images, student), normalised(images, teacher))
        signals = synthetic_signals(student.model, teacher.model, inputs, targets, args.tau)
        student_preds, _ = predictions(student.model, test_set, info, mean=student.mean, std=student.std)
        real_disagreement = [None if a is None else round(1 - a, 4)
                             for a in per_class(student_preds == teacher_preds, labels, info.num_classes)]
        correlation = {name: round((-1 if name.removesuffix("_unmixed") in LOW_MEANS_HARD else 1)
                                   * spearman(values, real_disagreement), 3) for name, values in signals.items()}
        rows.append({"run": str(run), "images_per_class": [round(v, 1) for v in targets.sum(0).tolist()],
                     "real_disagreement": real_disagreement,
                     "real_accuracy": per_class(student_preds == labels, labels, info.num_classes),
                     **{name: rounded(values) for name, values in signals.items()},
                     "spearman_with_real_disagreement": correlation})
        print(run, correlation, flush=True)
    for folder in args.synthetic:
        images, targets = load_export(folder, info.channels)
        signals = synthetic_signals(None, teacher.model, (None, normalised(images, teacher)), targets, args.tau)
        rows.append({"synthetic": str(folder), "images_per_class": [round(v, 1) for v in targets.sum(0).tolist()],
                     **{name: rounded(values) for name, values in signals.items()}})
    write_results(run_metadata("benchmarks.class_signals", argv) | {
        "class_names": list(info.class_names), "teacher": args.teacher, "tau": args.tau,
        "real_test_teacher": {name: rounded(values) for name, values in real.items()},
        "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
