"""The embedded default world: committed weights, their provenance, and the scripts that reproduce them."""

import json

from engine.classifiers import DEFAULT_PRIOR, WEIGHTS_DIR

TEACHER = WEIGHTS_DIR / "teacher-mnist.safetensors"


def test_committed_teacher_and_prior_have_provenance():
    teacher = json.loads(TEACHER.with_suffix(".json").read_text())
    assert teacher["arch"] == "convnet2-w32" and teacher["dataset"] == "mnist"
    assert teacher["test_accuracy"] >= 0.993
    prior = json.loads((DEFAULT_PRIOR / "provenance.json").read_text())
    assert prior["dataset"] == "digits" and "MNIST" in prior["data"]  # trained on digits, says it never saw MNIST
    assert (DEFAULT_PRIOR / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (DEFAULT_PRIOR / "samples.png").exists()


def test_evaluate_remeasures_the_committed_teacher(capsys):
    from engine.evaluate import main

    assert main(["--teacher", "default", "--dataset", "mnist"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] >= 0.993 and result["n"] == 10000


def test_train_teacher_script_writes_weights_and_provenance(tmp_path):
    from engine.train_teacher import main

    out = tmp_path / "t"
    assert main(["--arch", "convnet-w8", "--dataset", "digits", "--split", "train", "--epochs", "0.2",
                 "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["arch"] == "convnet-w8" and 0.0 <= meta["test_accuracy"] <= 1.0
    assert out.with_suffix(".safetensors").exists()


def test_train_prior_script_saves_a_loadable_diffusers_folder(tmp_path):
    from diffusers import UNet2DModel

    from engine.train_prior import save_prior, train_prior

    unet, scheduler, provenance = train_prior(steps=2, batch_size=4, jitter_copies=0)
    save_prior(unet, scheduler, provenance, tmp_path / "prior")
    loaded = UNet2DModel.from_pretrained(tmp_path / "prior", subfolder="unet")
    assert loaded.config.num_class_embeds == 11
    assert json.loads((tmp_path / "prior" / "provenance.json").read_text())["steps"] == 2


def test_student_is_clearly_smaller_than_teacher():
    from engine.config import RunConfig
    from models.base import count_parameters
    from models.registry import build_classifier

    student = count_parameters(build_classifier(RunConfig().student, 10, 1))
    teacher = count_parameters(build_classifier("convnet2-w32", 10, 1))
    assert student * 3 < teacher
