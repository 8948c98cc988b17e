"""The prior adapters against their raw diffusers models: tiny random-weight priors saved and loaded back offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.priors import (
    Cond,
    DiffusionPrior,
    DiTPrior,
    PixelPrior,
    PriorLoadError,
    StableDiffusionPrior,
    encode_prompts,
    load_prior,
    resolve_class_map,
)
from tests.tiny_priors import TINY_DIT_CLASSES, save_tiny_dit, save_tiny_pixel_prior, save_tiny_sd

DEFAULT_PRIOR = Path(__file__).resolve().parents[1] / "models" / "weights" / "prior-digits"
PIXEL_NAMES = ["class0", "class1", "class2"]
SD_NAMES = ["cat", "sea_lion"]
DIT_NAMES = [f"c{k}" for k in range(TINY_DIT_CLASSES)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("priors")
    return {
        "pixel": save_tiny_pixel_prior(root / "pixel"),
        "sd": save_tiny_sd(root / "sd"),
        "dit": save_tiny_dit(root / "dit"),
    }


@pytest.fixture(scope="module")
def priors(folders) -> dict[str, DiffusionPrior]:
    names = {"pixel": PIXEL_NAMES, "sd": SD_NAMES, "dit": DIT_NAMES}
    return {kind: load_prior(folders[kind], names[kind]) for kind in folders}


def raw_model_output(prior: DiffusionPrior, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The network called directly, the way diffusers' own pipelines call it."""
    if isinstance(prior, PixelPrior):
        return prior.unet(z, t, class_labels=labels).sample
    if isinstance(prior, StableDiffusionPrior):
        return prior.unet(z, t, encoder_hidden_states=labels).sample
    return prior.transformer(z, timestep=t, class_labels=labels).sample[:, : z.shape[1]]  # drop learned sigma


EXPECTED = {  # kind -> (class, latent_shape, image_channels, image_size, is_latent)
    "pixel": (PixelPrior, (1, 8, 8), 1, 8, False),
    "sd": (StableDiffusionPrior, (4, 8, 8), 3, 16, True),
    "dit": (DiTPrior, (4, 8, 8), 3, 16, True),
}


@pytest.mark.parametrize("kind", ["pixel", "sd", "dit"])
def test_kind_detected_shapes_and_frozen(priors, kind):
    prior = priors[kind]
    cls, latent_shape, channels, size, is_latent = EXPECTED[kind]
    assert type(prior) is cls and prior.kind == kind
    assert (prior.latent_shape, prior.image_channels, prior.image_size, prior.is_latent) == (
        latent_shape, channels, size, is_latent)
    assert prior.class_conditional
    assert type(prior.scheduler).__name__ == "DDIMScheduler"
    assert not any(p.requires_grad for p in prior.parameters())
    prior.train()  # stays in eval: DiT would otherwise drop labels at random
    assert not any(m.training for m in prior.modules())


@pytest.mark.parametrize("kind", ["pixel", "sd", "dit"])
def test_predict_noise_is_classifier_free_guidance(priors, kind):
    prior = priors[kind]
    torch.manual_seed(0)
    z = torch.randn(3, *prior.latent_shape)
    t = torch.tensor(500)
    cond = prior.condition(torch.tensor([0, 1, 0]))
    with torch.no_grad():
        eps_c = raw_model_output(prior, z, t.expand(3), cond.cond)
        eps_u = raw_model_output(prior, z, t.expand(3), cond.uncond)
        cond_only = prior.predict_noise(z, 500, cond, guidance_scale=1.0)
        guided = prior.predict_noise(z, t, cond, guidance_scale=3.0)
    assert cond_only.shape == z.shape
    torch.testing.assert_close(cond_only, eps_c, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)
    assert (eps_c - eps_u).abs().max() > 1e-6  # the two branches really differ


@pytest.mark.parametrize("kind", ["pixel", "sd", "dit"])
def test_per_sample_timesteps(priors, kind):
    prior = priors[kind]
    torch.manual_seed(1)
    z = torch.randn(2, *prior.latent_shape)
    cond = prior.condition([1, 0])
    with torch.no_grad():
        batched = prior.predict_noise(z, torch.tensor([10, 900]), cond, guidance_scale=2.0)
        first = prior.predict_noise(z[:1], 10, cond.select(torch.tensor([0])), guidance_scale=2.0)
        second = prior.predict_noise(z[1:], torch.tensor(900), cond.select(torch.tensor([1])), guidance_scale=2.0)
    torch.testing.assert_close(batched, torch.cat([first, second]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["pixel", "sd", "dit"])
def test_decode_differentiable_and_encode_shape(priors, kind):
    prior = priors[kind]
    torch.manual_seed(2)
    z = torch.randn(2, *prior.latent_shape, requires_grad=True)
    images = prior.decode(z)
    assert images.shape == (2, prior.image_channels, prior.image_size, prior.image_size)
    (grad,) = torch.autograd.grad(images.square().sum(), z)
    assert grad.abs().sum() > 0
    z0 = prior.encode(images.detach().clamp(0, 1))
    assert z0.shape == (2, *prior.latent_shape)


def test_gradient_flows_through_predict_noise(priors):
    prior = priors["sd"]
    z = torch.randn(2, *prior.latent_shape, requires_grad=True)
    eps = prior.predict_noise(z, 300, prior.condition([0, 1]), guidance_scale=4.0)
    (grad,) = torch.autograd.grad(eps.sum(), z)
    assert grad.abs().sum() > 0


def test_pixel_decode_encode_are_the_range_map(priors):
    prior = priors["pixel"]
    z = torch.linspace(-1.5, 1.5, 64).view(1, 1, 8, 8)
    torch.testing.assert_close(prior.decode(z), (z + 1) / 2)  # not clamped
    torch.testing.assert_close(prior.encode(prior.decode(z)), z)


def test_condition_ids_null_class_and_unconditional(priors):
    pixel, dit = priors["pixel"], priors["dit"]
    cond = pixel.condition(torch.tensor([2, 0]))
    assert cond.cond.tolist() == [2, 0] and cond.uncond.tolist() == [3, 3]  # null class = num_class_embeds - 1
    assert dit.condition([4]).uncond.tolist() == [TINY_DIT_CLASSES]  # DiT's null id = num_embeds_ada_norm
    uncond = pixel.condition(None, batch_size=2)
    assert not uncond.is_conditional and len(uncond) == 2
    z = torch.randn(2, *pixel.latent_shape)
    with torch.no_grad():
        expected = pixel.unet(z, torch.tensor([7, 7]), class_labels=torch.tensor([3, 3])).sample
        torch.testing.assert_close(pixel.predict_noise(z, 7, uncond, guidance_scale=5.0), expected)
    with pytest.raises(ValueError, match="class ids"):
        pixel.condition([3])
    with pytest.raises(ValueError, match="batch_size"):
        pixel.condition(None)


def test_cond_select_and_cat(priors):
    cond = priors["sd"].condition(torch.tensor([0, 1, 1, 0]))
    parts = [cond.select(torch.tensor([2, 0])), cond.select(torch.tensor([False, True, False, True]))]
    merged = Cond.cat(parts)
    assert len(merged) == 4 and merged.cond.shape == (4, *cond.cond.shape[1:])
    torch.testing.assert_close(merged.cond, cond.cond[[2, 0, 1, 3]])
    torch.testing.assert_close(merged.uncond, cond.uncond[[2, 0, 1, 3]])
    with pytest.raises(ValueError, match="class-free"):
        Cond.cat([cond, priors["sd"].condition(None, batch_size=1)])


def test_sd_prompt_embeddings_and_text_encoder_freed(folders, priors):
    from transformers import CLIPTextModel, CLIPTokenizer

    prior = priors["sd"]
    assert prior.prompts == ("a photo of a cat", "a photo of a sea lion")
    assert not any("text_encoder" in name for name, _ in prior.named_modules())
    text_encoder = CLIPTextModel.from_pretrained(folders["sd"] / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(folders["sd"] / "tokenizer")
    expected = encode_prompts(text_encoder, tokenizer, ["", "a photo of a sea lion"])
    cond = prior.condition([1])
    torch.testing.assert_close(cond.uncond[0], expected[0])
    torch.testing.assert_close(cond.cond[0], expected[1])


def test_sd_class_free_prompt_is_guided_against_the_empty_prompt(folders):
    prior = load_prior(folders["sd"], SD_NAMES, class_free_prompt="a photo")
    assert not prior.class_conditional and prior.prompts == ("a photo",)
    cond = prior.condition(torch.tensor([0, 1]))
    assert cond.is_conditional
    torch.testing.assert_close(cond.cond[0], cond.cond[1])  # one prompt for every class
    torch.testing.assert_close(cond.uncond, prior.condition(None, batch_size=2).uncond)  # the empty prompt
    z = torch.randn(2, *prior.latent_shape)
    t = torch.tensor([400, 400])
    with torch.no_grad():
        fixed = prior.unet(z, t, encoder_hidden_states=cond.cond).sample
        empty = prior.unet(z, t, encoder_hidden_states=cond.uncond).sample
        guided = prior.predict_noise(z, 400, cond, guidance_scale=7.5)
        torch.testing.assert_close(guided, empty + 7.5 * (fixed - empty))
        torch.testing.assert_close(prior.predict_noise(z, 400, cond, guidance_scale=1.0), fixed)
    assert not torch.allclose(fixed, empty)  # otherwise the test could not tell s=7.5 from s=1


def test_dit_class_map_required_and_used(tmp_path, folders):
    with pytest.raises(PriorLoadError, match="class_map"):
        load_prior(folders["dit"], ["airplane", "ship"])
    prior = load_prior(folders["dit"], ["airplane", "ship"], class_map={0: 3, "ship": 1})
    assert prior.condition([0, 1, 1]).cond.tolist() == [3, 1, 1]
    assert load_prior(folders["dit"], ["airplane", "ship"], class_map=[4, 0]).condition([0, 1]).cond.tolist() == [4, 0]
    with pytest.raises(PriorLoadError, match="outside"):
        load_prior(folders["dit"], ["airplane", "ship"], class_map=[4, TINY_DIT_CLASSES])
    with pytest.raises(PriorLoadError, match="no prior class"):
        load_prior(folders["dit"], ["airplane", "ship"], class_map={0: 3})
    with pytest.raises(PriorLoadError, match="class_map applies"):
        load_prior(folders["sd"], SD_NAMES, class_map=[0, 1])
    # Hub DiTs name their ImageNet classes in model_index.json: teacher names are matched to them.
    named = save_tiny_dit(tmp_path / "named", id2label={0: "tench, Tinca tinca", 1: "goldfish", 2: "great white shark",
                                                         3: "tiger shark", 4: "hammerhead"})
    prior = load_prior(named, ["goldfish", "Tench", "hammerhead"])
    assert prior.condition([0, 1, 2]).cond.tolist() == [1, 0, 4]


def test_json_class_map_keys():
    """A JSON object's keys are strings: "1" is teacher class 1, unless a teacher class is named "1"."""
    assert resolve_class_map(["airplane", "ship"], {"0": 3, "1": 1}, 5) == [3, 1]
    assert resolve_class_map(["1", "0"], {"0": 3, "1": 4}, 5) == [4, 3]


@pytest.mark.parametrize("name, expected", [
    ("ddim", "DDIMScheduler"), ("ddpm", "DDPMScheduler"), ("dpm", "DPMSolverMultistepScheduler"),
    ("EulerDiscreteScheduler", "EulerDiscreteScheduler"), ("pndm", "PNDMScheduler"),
    ("unipc", "UniPCMultistepScheduler"),
])
def test_scheduler_by_name_keeps_the_saved_noise_schedule(folders, name, expected):
    prior = load_prior(folders["pixel"], PIXEL_NAMES, scheduler=name)
    assert type(prior.scheduler).__name__ == expected
    assert prior.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert prior.scheduler.config.prediction_type == "epsilon"


def test_unknown_scheduler(folders):
    with pytest.raises(PriorLoadError, match="unknown scheduler 'nope'"):
        load_prior(folders["pixel"], PIXEL_NAMES, scheduler="nope")


def test_v_prediction_is_converted_to_epsilon(tmp_path):
    prior = load_prior(save_tiny_pixel_prior(tmp_path / "v", prediction_type="v_prediction"), PIXEL_NAMES)
    assert prior.prediction_type == "v_prediction" and prior.scheduler.config.prediction_type == "epsilon"
    z, t = torch.randn(2, *prior.latent_shape), torch.tensor([100, 700])
    cond = prior.condition([0, 1])
    with torch.no_grad():
        v = prior.unet(z, t, class_labels=cond.cond).sample
        eps = prior.predict_noise(z, t, cond)
    alpha_bar = prior.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, alpha_bar.sqrt() * v + (1 - alpha_bar).sqrt() * z)


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such-prior"
    with pytest.raises(PriorLoadError) as info:
        load_prior(missing, PIXEL_NAMES)
    message = str(info.value)
    assert str(missing) in message and "\n" not in message


def test_folder_that_is_not_a_prior(tmp_path, folders):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PriorLoadError, match="not a diffusers prior"):
        load_prior(tmp_path / "empty", PIXEL_NAMES)
    (tmp_path / "no-scheduler" / "unet").mkdir(parents=True)
    with pytest.raises(PriorLoadError, match="no scheduler/"):
        load_prior(tmp_path / "no-scheduler", PIXEL_NAMES)


def test_unreachable_hub_id_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PriorLoadError) as info:
        load_prior("nobody-here/tiny-prior-not-cached", PIXEL_NAMES)
    message = str(info.value)
    assert "\n" not in message
    assert "nobody-here/tiny-prior-not-cached" in message and "local folder" in message and "HF_HUB_OFFLINE" in message


@pytest.mark.skipif(not (DEFAULT_PRIOR / "unet").is_dir(), reason="default-world prior not trained yet")
def test_default_world_prior_loads():
    prior = load_prior(DEFAULT_PRIOR, [str(k) for k in range(10)])
    assert isinstance(prior, PixelPrior)
    assert prior.latent_shape == (1, 28, 28) and prior.image_channels == 1 and prior.null_class == 10
    z = torch.randn(2, *prior.latent_shape)
    with torch.no_grad():
        eps = prior.predict_noise(z, torch.tensor([999, 500]), prior.condition([3, 7]), guidance_scale=2.0)
    assert eps.shape == z.shape and torch.isfinite(eps).all()
    assert prior.decode(z).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_latent_decode_and_encode_undo_the_vae_scaling_factor(priors, kind):
    """z lives in the VAE's scaled latent space: decode divides by the scaling factor, encode multiplies by it."""
    prior = priors[kind]
    scale = prior.vae.config.scaling_factor
    assert scale != 1.0  # otherwise a decoder that forgot to divide would pass
    z = torch.randn(2, *prior.latent_shape)
    with torch.no_grad():
        torch.testing.assert_close(prior.decode(z), (prior.vae.decode(z / scale).sample + 1) / 2)
        images = torch.rand(2, prior.image_channels, prior.image_size, prior.image_size)
        torch.testing.assert_close(prior.encode(images), prior.vae.encode(images * 2 - 1).latent_dist.mean * scale)
