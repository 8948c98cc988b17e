"""The cost of the guided step (issue 19): the FLOP counter, the tiny guidance decoder, --prior-resolution, the frozen
weights' dtype, channels_last and --compile. Tiny saved SD folders and a tiny AutoencoderTiny, offline."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from engine.config import RunConfig, parse_config
from engine.datasets import DatasetInfo
from engine.errors import UserError
from engine.sampler import GuidanceConfig, GuidedSampler, TeacherView
from engine.world import frozen_dtype, load_run_prior, speed_up, store_frozen
from models.priors import load_prior
from models.registry import build_classifier
from tests.tiny_priors import save_tiny_pixel_prior, save_tiny_sd, save_tiny_taesd

NAMES = ("cat", "sea_lion")
INFO = DatasetInfo("tiny", NAMES, (0.5,), (0.25,), 8, 1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cost")
    return {"sd": save_tiny_sd(root / "sd"), "taesd": save_tiny_taesd(root / "taesd"),
            "pixel": save_tiny_pixel_prior(root / "pixel")}


def tiny_teacher(dtype=torch.float32):
    torch.manual_seed(0)
    return build_classifier("convnet-w8", len(NAMES), 1).eval().requires_grad_(False).to(dtype)


def first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def last_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]


def run_cfg(folders, *flags: str) -> RunConfig:
    return parse_config(["--prior", str(folders["sd"]), "--device", "cpu", *flags]).resolved()


def test_flop_counter_counts_the_guided_step_above_the_unguided_one(folders):
    from benchmarks.flops import count_sampler

    prior = load_prior(folders["sd"], NAMES).to("meta")  # counted on meta tensors, as for SD-1.5
    with torch.device("meta"):
        teacher, student = tiny_teacher(), tiny_teacher()
        view = TeacherView(8, 1, (0.5,), (0.25,))
    full = count_sampler(prior, teacher, student, view, len(NAMES), steps=2)
    assert full["step_unguided"] == full["prior_forward_cfg"] > 0  # CFG: one UNet call on 2B, nothing else
    # full: + UNet backward + decoder forward/backward + recompute; detached: no UNet backward; reuse: no recompute
    assert full["step_full"] > full["step_detached"] > full["step_detached_reuse"] > full["step_unguided"]
    assert full["step_detached_reuse"] - full["step_unguided"] > full["decode_full"]  # decoder forward + backward

    from diffusers import AutoencoderTiny

    prior.set_guidance_decoder(AutoencoderTiny.from_pretrained(str(folders["taesd"])).to("meta"))
    tiny = count_sampler(prior, teacher, student, view, len(NAMES), steps=2)
    assert tiny["decode_for_guidance"] < tiny["decode_full"] == full["decode_full"]
    assert tiny["step_full"] < full["step_full"] and tiny["finish"] == full["finish"]  # final images: the full VAE


def test_the_tiny_decoder_decodes_for_guidance_and_the_vae_for_final_images(folders):
    cfg = run_cfg(folders, "--guidance-decoder", "tiny", "--guidance-decoder-path", str(folders["taesd"]))
    prior = load_run_prior(cfg, INFO, torch.device("cpu"))
    assert type(prior.guidance_decoder).__name__ == "AutoencoderTiny"
    calls = {"tiny": 0, "vae": 0}

    def spy(module, name):
        decode = module.decode

        def counted(*args, **kwargs):
            calls[name] += 1
            return decode(*args, **kwargs)
        module.decode = counted

    spy(prior.guidance_decoder, "tiny")
    spy(prior.vae, "vae")
    sampler = GuidedSampler(prior, tiny_teacher(), TeacherView(8, 1, (0.5,), (0.25,)), len(NAMES),
                            GuidanceConfig(steps=3))
    batch = sampler.start(torch.tensor([0, 1]), torch.tensor([0, 1]))
    z = batch.z.clone()
    sampler.step(batch)
    assert calls == {"tiny": 1, "vae": 0}  # the guided step's x̂0 came from the tiny decoder only
    # ... and its gradient moved the latent: the same step without the latent update differs
    unguided = GuidedSampler(prior, tiny_teacher(), sampler.view, len(NAMES), GuidanceConfig(steps=3, bn=0, cls=0))
    plain = unguided.start(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert torch.equal(plain.z, z)
    unguided.step(plain)
    assert not torch.allclose(plain.z, batch.z)
    while not batch.done:
        sampler.step(batch)
    images, _ = sampler.finish(batch)
    assert calls == {"tiny": 3, "vae": 1} and images.shape == (2, 1, 8, 8)  # final images: the full VAE, once
    prior.enable_gradient_checkpointing(True)  # --grad-checkpointing covers the decoder the gradient crosses
    assert prior.guidance_decoder.decoder.gradient_checkpointing and prior.unet.is_gradient_checkpointing


def test_the_guidance_decoder_flags_are_checked(folders):
    with pytest.raises(UserError, match="guidance-decoder-path"):
        run_cfg(folders, "--guidance-decoder", "tiny")
    pixel = RunConfig(prior=str(folders["pixel"]), guidance_decoder="tiny",
                      guidance_decoder_path=str(folders["taesd"]))
    with pytest.raises(UserError, match="latent priors"):
        load_run_prior(pixel, DatasetInfo("tiny", ("class0", "class1", "class2"), (0.5,), (0.25,), 8, 1), "cpu")


def test_prior_resolution_changes_the_latent_shape_and_warns_below_native(folders, caplog):
    native = load_run_prior(run_cfg(folders), INFO, torch.device("cpu"))
    assert native.latent_shape == (4, 8, 8) and native.image_size == 16
    with caplog.at_level(logging.WARNING, logger="models.priors"):
        low = load_run_prior(run_cfg(folders, "--prior-resolution", "8"), INFO, torch.device("cpu"))
    assert low.latent_shape == (4, 4, 4) and low.image_size == 8  # latent = resolution / the VAE's downscale
    assert "below the 16 px it was trained at" in caplog.text
    sampler = GuidedSampler(low, tiny_teacher(), TeacherView(8, 1, (0.5,), (0.25,)), len(NAMES),
                            GuidanceConfig(steps=2))
    images, _, batch = sampler.sample(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert batch.z.shape == (2, 4, 4, 4) and images.shape == (2, 1, 8, 8)


def test_frozen_weights_are_bf16_only_for_bf16_on_cuda():
    assert frozen_dtype("cuda", "auto") == frozen_dtype("cuda:1", "bf16") == torch.bfloat16
    for device, precision in [("cpu", "auto"), ("cpu", "bf16"), ("cuda", "fp16"), ("cuda", "no")]:
        assert frozen_dtype(device, precision) == torch.float32, (device, precision)


def test_bf16_frozen_weights_keep_the_latents_and_their_gradient_float32(folders):
    """The CUDA bf16 path, on the CPU: bf16 prior, VAE, text encoder and teacher (BatchNorm float32), the guided
    step under bf16 autocast; the latents stay float32 and still move."""
    prior = load_prior(folders["sd"], NAMES, torch_dtype=torch.bfloat16)
    assert prior.dtype == prior.vae.dtype == prior.class_embeddings.dtype == torch.bfloat16
    teacher = store_frozen(tiny_teacher(), torch.bfloat16)
    assert first_conv(teacher).weight.dtype == torch.bfloat16
    norms = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.weight.dtype == m.running_var.dtype == torch.float32 for m in norms)
    assert teacher(torch.rand(2, 1, 8, 8)).shape == (2, len(NAMES))  # float32 input outside autocast: cast by a hook
    sampler = GuidedSampler(prior, teacher, TeacherView(8, 1, (0.5,), (0.25,)), len(NAMES), GuidanceConfig(steps=2))
    batch = sampler.start(torch.tensor([0, 1]), torch.tensor([0, 1]))
    z = batch.z.clone()
    with torch.autocast("cpu", torch.bfloat16):
        eps = sampler.guidance_step(batch, batch.scheduler.timesteps[0], None)
    assert batch.z.dtype == eps.dtype == torch.float32 and not torch.equal(batch.z, z)
    images, logits = sampler.finish(batch)  # outside autocast, as engine.synthesize runs
    assert images.dtype == logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_channels_last_on_cuda_only_and_compile_in_place(folders):
    prior = load_prior(folders["sd"], NAMES)
    teacher, student = tiny_teacher(), tiny_teacher()
    conv = prior.unet.conv_in.weight
    speed_up(RunConfig(), torch.device("cpu"), prior, teacher, student)
    assert prior.unet.conv_in.weight.is_contiguous()  # CPU: nothing changes
    speed_up(RunConfig(), torch.device("cuda"), prior, teacher, student)  # the modules may stay on the CPU here
    for weight in (prior.unet.conv_in.weight, prior.vae.decoder.conv_in.weight, last_conv(teacher).weight,
                   last_conv(student).weight):  # weights with C > 1, where the two layouts differ
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert conv.shape == prior.unet.conv_in.weight.shape
    speed_up(RunConfig(compile=True, channels_last=False), torch.device("cpu"), prior, teacher, student)
    assert prior.unet._compiled_call_impl is not None and student._compiled_call_impl is not None
    names = set(student.state_dict())
    assert names == set(tiny_teacher().state_dict())  # in place: checkpoints keep their parameter names


def test_compiled_student_matches_eager():  # torch.compile (inductor) on the CPU: ~15 s for this tiny net
    student = tiny_teacher()
    x = torch.rand(4, 1, 8, 8)
    eager = student(x)
    speed_up(RunConfig(compile=True), torch.device("cpu"), None, tiny_teacher(), student)
    torch.testing.assert_close(student(x), eager, rtol=1e-4, atol=1e-5)
