"""Tiny random-weight priors of every kind, saved in the diffusers layouts that ``models.priors.load_prior`` reads.

Seeded, built from configs (nothing is downloaded), a few hundred kB each, fast on CPU:

    save_tiny_pixel_prior(path)  # unet/ scheduler/ provenance.json (as engine/train_prior.py writes), 1x8x8 images
    save_tiny_sd(path)           # SD layout with model_index.json; 3x16x16 images, 4x8x8 latents
    save_tiny_dit(path)          # DiT layout with model_index.json; 3x16x16 images, 4x8x8 latents, 5 classes
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

TINY_TEXT_LENGTH = 16  # tokenizer max length (SD uses 77)
TINY_DIT_CLASSES = 5


def tiny_vae(size: int = 16):
    """AutoencoderKL with two blocks: a 3x``size``x``size`` image <-> a 4x(size/2)x(size/2) latent."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=size,
    )


def tiny_sd_scheduler():
    """SD's own scheduler config (PNDM, scaled-linear betas), so loading exercises the conversion to DDIM."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                         set_alpha_to_one=False, steps_offset=1)


def save_tiny_pixel_prior(
    path: str | Path, num_classes: int = 3, size: int = 8, prediction_type: str = "epsilon"
) -> Path:
    """A class-conditional pixel ``UNet2DModel`` (null class = ``num_classes``), saved as engine.train_prior does."""
    from diffusers import DDPMScheduler, UNet2DModel

    path = Path(path)
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
        num_class_embeds=num_classes + 1,
    )
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    unet.save_pretrained(path / "unet")
    scheduler.save_pretrained(path / "scheduler")
    provenance = {"class_names": [f"class{k}" for k in range(num_classes)], "dataset": "tiny-random"}
    (path / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return path


def tiny_clip(folder: Path):
    """A 2-layer, 32-wide CLIP text encoder and a CLIPTokenizer built offline from a handwritten vocab and merges."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits)
    # CLIP BPE: a word's last symbol carries "</w>"; a few merges so that "photo" is not all single letters.
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars), "ph", "ot", "pho", "phot"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\np h\no t\nph o\nph ot\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=TINY_TEXT_LENGTH)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_TEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval(), tokenizer


def save_tiny_sd(path: str | Path, size: int = 16) -> Path:
    """A tiny Stable Diffusion folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    path = Path(path)
    with tempfile.TemporaryDirectory() as vocab_folder:
        text_encoder, tokenizer = tiny_clip(Path(vocab_folder))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(size), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=tiny_sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path


def save_tiny_taesd(path: str | Path) -> Path:
    """A tiny ``AutoencoderTiny`` (TAESD architecture) for the tiny SD/DiT latents: 4x8x8 <-> 3x16x16."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(path)
    return Path(path)


def save_tiny_dit(path: str | Path, size: int = 16, id2label: dict[int, str] | None = None,
                  num_classes: int = TINY_DIT_CLASSES) -> Path:
    """A tiny DiT folder (transformer/ vae/ scheduler/ model_index.json), ``num_classes`` classes + null (1000
    for ImageNet ids, as the hub DiTs)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    path = Path(path)
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma: ε and variance
        num_layers=2,
        norm_num_groups=4,
        sample_size=size // 2,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    )
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=transformer, vae=tiny_vae(size), scheduler=scheduler).save_pretrained(path)
    if id2label is not None:  # the hub DiTs list ImageNet labels in model_index.json
        index = json.loads((path / "model_index.json").read_text())
        index["id2label"] = {str(k): v for k, v in id2label.items()}
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
