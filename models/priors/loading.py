"""Loading a prior from a local diffusers folder or a hub id: kind detection, schedulers, class maps, one-line
errors."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.json_files import read_json_object
from models.priors.interface import SCHEDULERS, DiffusionPrior, PriorLoadError, _frozen, _square
from models.priors.latent import DiTPrior, StableDiffusionPrior, vae_scale_factor
from models.priors.pixel import PixelPrior

log = logging.getLogger(__name__)

PIPELINE_KINDS = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "DiTPipeline": "dit",
    "DDPMPipeline": "pixel",
    "DDIMPipeline": "pixel",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_prior(
    spec: str | os.PathLike,
    class_names: Sequence[str],
    *,
    scheduler: str = "ddim",
    class_map: Mapping[int | str, int | str] | Sequence[int | str] | None = None,
    prompt_template: str = "a photo of a {}",
    class_free_prompt: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    local_files_only: bool | None = None,
    image_size: int | None = None,
    device: torch.device | str = "cpu",
    guidance_decoder: str | os.PathLike | None = None,
) -> DiffusionPrior:
    """Load a prior from a local diffusers folder or a hub id, its kind detected (``detect_prior_kind``).

    ``class_names`` are the teacher's classes (prompts for SD; matched by name to the prior's labels for pixel/DiT
    priors when the folder names them). ``class_map``: teacher class (index or name) -> prior class id (or label), a
    dict or a list; required for pixel/DiT priors whose classes are not the teacher's. ``scheduler``: a short name
    (``SCHEDULERS``) or a diffusers scheduler class name, built from the saved scheduler config. ``local_files_only``
    defaults to ``HF_HUB_OFFLINE`` read at call time. ``image_size`` overrides the resolution the prior samples at
    (a warning when below the one it was trained at). ``guidance_decoder``: a folder or hub id of a diffusers
    ``AutoencoderTiny`` (TAESD) for x̂0 inside the guided step of a latent prior (``set_guidance_decoder``).
    ``torch_dtype`` applies to every network, the text encoder and the guidance decoder included.
    """
    from diffusers import DDPMScheduler

    if not class_names:
        raise PriorLoadError("class_names is empty: pass the teacher's class names")
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    source = _resolve_source(spec)
    kind, index = detect_prior_kind(source, local_files_only=local_files_only)
    if class_map is not None and kind == "sd":
        raise PriorLoadError("class_map applies to class-id priors (pixel, DiT); SD priors take prompts per class")
    hub = {"local_files_only": local_files_only}
    weights = {"torch_dtype": torch_dtype, **hub}
    scheduler_config = dict(_from_pretrained(DDPMScheduler.load_config, source, "scheduler", **hub))
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    noise_scheduler = build_scheduler(scheduler, scheduler_config)

    if kind == "pixel":
        from diffusers import UNet2DModel

        unet = _from_pretrained(UNet2DModel.from_pretrained, source, "unet", **weights)
        embeds = unet.config.num_class_embeds
        class_to_prior = None
        if embeds is not None:  # the last class embedding is the null class
            class_to_prior = resolve_class_map(class_names, class_map, embeds - 1, _prior_labels(source, index))
        prior = PixelPrior(unet, noise_scheduler, class_names, class_to_prior, image_size, prediction_type)
    elif kind == "sd":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        unet = _from_pretrained(UNet2DConditionModel.from_pretrained, source, "unet", **weights)
        vae = _from_pretrained(AutoencoderKL.from_pretrained, source, "vae", **weights)
        tokenizer = _from_pretrained(CLIPTokenizer.from_pretrained, source, "tokenizer", **hub)
        # The text encoder runs once here, in torch_dtype, and is not kept: prompts are fixed per class.
        text_encoder = _frozen(_from_pretrained(CLIPTextModel.from_pretrained, source, "text_encoder", **weights))
        prior = StableDiffusionPrior(unet, vae, text_encoder.to(device), tokenizer, noise_scheduler, class_names,
                                     prompt_template, class_free_prompt, image_size, prediction_type)
        del text_encoder
    else:
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        transformer = _from_pretrained(DiTTransformer2DModel.from_pretrained, source, "transformer", **weights)
        vae = _from_pretrained(AutoencoderKL.from_pretrained, source, "vae", **weights)
        num_prior = transformer.config.num_embeds_ada_norm
        class_to_prior = resolve_class_map(class_names, class_map, num_prior, _prior_labels(source, index))
        prior = DiTPrior(transformer, vae, noise_scheduler, class_names, class_to_prior, image_size, prediction_type)
    if class_free_prompt is not None and kind != "sd":
        log.warning("class_free_prompt only applies to Stable Diffusion priors; ignored for a %s prior", kind)
    prior.source = str(spec)
    denoiser = prior.transformer if kind == "dit" else prior.unet
    factor = vae_scale_factor(prior.vae) if prior.is_latent else 1
    native = _square(denoiser.config.sample_size, "sample_size") * factor
    if image_size is not None and image_size < native:
        log.warning("sampling the %s prior at %d px, below the %d px it was trained at: its images may degrade "
                    "(fewer details, broken layouts)", kind, image_size, native)
    if guidance_decoder is not None:
        if not prior.is_latent:
            raise PriorLoadError("a guidance decoder applies to latent priors (SD, DiT); a pixel prior has no decoder")
        prior.set_guidance_decoder(load_guidance_decoder(guidance_decoder, torch_dtype, local_files_only))
    prior.to(device=device, dtype=torch_dtype)
    prior.requires_grad_(False).eval()
    log.info("loaded %s prior from %s: latent %s, images %dx%dx%d, scheduler %s", kind, spec, prior.latent_shape,
             prior.image_channels, prior.image_size, prior.image_size, type(noise_scheduler).__name__)
    return prior


def load_guidance_decoder(
    spec: str | os.PathLike, torch_dtype: torch.dtype = torch.float32, local_files_only: bool = False
) -> nn.Module:
    """A diffusers ``AutoencoderTiny`` (TAESD; the hub's ``madebyollin/taesd`` fits SD 1.x/2.x and DiT latents) from
    a folder (its config.json at the top or in ``vae/``) or a hub id."""
    from diffusers import AutoencoderTiny

    try:
        source = _resolve_source(spec)
    except PriorLoadError:
        raise PriorLoadError(f"guidance decoder {spec}: not a folder or hub id of an AutoencoderTiny") from None
    top = not isinstance(source, Path) or (source / "config.json").is_file() or not (source / "vae").is_dir()
    try:
        return AutoencoderTiny.from_pretrained(str(source), subfolder=None if top else "vae", torch_dtype=torch_dtype,
                                               local_files_only=local_files_only)
    except Exception as err:  # hub, file and config errors come in many types
        if isinstance(source, str):
            raise _hub_error(source, err, local_files_only) from err
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise PriorLoadError(f"cannot load the guidance decoder (AutoencoderTiny) from {source}: "
                             f"{type(err).__name__}: {reason}") from err


def build_scheduler(name: str, config: Mapping[str, Any]) -> Any:
    """A diffusers scheduler by short name or class name, built from a saved config, consuming ε (see module doc)."""
    import inspect

    import diffusers

    class_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise PriorLoadError(f"unknown scheduler '{name}': use {', '.join(SCHEDULERS)} or a diffusers scheduler class")
    # predict_noise always returns ε (v- and x0-predictions are converted), so the scheduler must consume ε.
    takes_prediction_type = "prediction_type" in inspect.signature(cls.__init__).parameters
    return cls.from_config(dict(config), **({"prediction_type": "epsilon"} if takes_prediction_type else {}))


def detect_prior_kind(source: str | Path, local_files_only: bool = False) -> tuple[str, dict[str, Any]]:
    """``("pixel" | "sd" | "dit", model_index)`` from model_index.json's ``_class_name`` or which components exist."""
    index = _read_json(source, "model_index.json", local_files_only)
    if index is not None and index.get("_class_name") in PIPELINE_KINDS:
        return PIPELINE_KINDS[index["_class_name"]], index
    if index is not None:
        components = set(index)
    elif isinstance(source, Path):
        components = {p.name for p in source.iterdir() if p.is_dir()}
    elif _read_json(source, "unet/config.json", local_files_only) is not None:  # a hub repo without model_index.json
        components = {"unet"}
    else:
        components = set()
    if "transformer" in components:
        return "dit", index or {}
    if {"unet", "vae", "text_encoder"} <= components:
        return "sd", index or {}
    if "unet" in components:
        return "pixel", index or {}
    raise PriorLoadError(f"{source} is not a diffusers prior: expected transformer/ (DiT), unet/+vae/+text_encoder/ "
                         "(Stable Diffusion) or unet/ (pixel), or a model_index.json naming them")


def resolve_class_map(
    class_names: Sequence[str],
    class_map: Mapping[int | str, int | str] | Sequence[int | str] | None,
    num_prior_classes: int,
    prior_labels: Mapping[str, int] | None = None,
) -> list[int]:
    """Teacher class index -> prior class id, for class-id priors (pixel, DiT).

    In order: the explicit ``class_map`` (keys: teacher index or name; values: prior id or prior label); else by
    name when the prior names its classes and every teacher name is one of them; else the identity when both have
    the same number of classes; else an error asking for ``class_map``.
    """
    labels = {_normalise(k): v for k, v in (prior_labels or {}).items()}
    if class_map is None:
        if labels and all(_normalise(n) in labels for n in class_names):
            return [labels[_normalise(n)] for n in class_names]
        if len(class_names) == num_prior_classes:
            if labels:
                log.warning("teacher class names do not match the prior's labels; assuming class i = prior class i")
            return list(range(len(class_names)))
        raise PriorLoadError(f"the prior has {num_prior_classes} classes and the teacher {len(class_names)}: pass "
                             'class_map (teacher class index or name -> prior class id), e.g. {"0": 404, "1": 817}')
    if isinstance(class_map, Mapping):  # JSON keys are strings: "3" is teacher class 3 unless a class is named "3"
        by_key = {(class_names.index(k) if k in class_names else int(k) if str(k).isdigit() else k): v
                  for k, v in class_map.items()}
        missing = [n for i, n in enumerate(class_names) if i not in by_key]
        if missing:
            raise PriorLoadError(f"class_map has no prior class for teacher classes {missing}")
        values = [by_key[i] for i in range(len(class_names))]
    else:
        values = list(class_map)
        if len(values) != len(class_names):
            raise PriorLoadError(f"class_map lists {len(values)} prior ids for {len(class_names)} teacher classes")
    ids = []
    for value in values:
        if isinstance(value, str):
            if _normalise(value) not in labels:
                raise PriorLoadError(f"class_map value '{value}' is not one of the prior's class labels")
            value = labels[_normalise(value)]
        if not 0 <= int(value) < num_prior_classes:
            raise PriorLoadError(f"class_map id {value} is outside the prior's classes [0, {num_prior_classes})")
        ids.append(int(value))
    return ids


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def _prior_labels(source: str | Path, index: Mapping[str, Any]) -> dict[str, int] | None:
    """The prior's class names: DiT's ``id2label`` in model_index.json (comma-separated synonyms), or the
    ``class_names`` of the default world's ``provenance.json``."""
    if index.get("id2label"):
        return {label: int(k) for k, value in index["id2label"].items() for label in value.split(",") if label.strip()}
    provenance = _read_json(source, "provenance.json", local_files_only=True) if isinstance(source, Path) else None
    if provenance and provenance.get("class_names"):
        return {name: i for i, name in enumerate(provenance["class_names"])}
    return None


def _resolve_source(spec: str | os.PathLike) -> str | Path:
    """A local folder (``Path``) or a hub id (``str``); a path-like spec that does not exist is an error."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PriorLoadError(f"prior {spec} is a file; pass the diffusers folder (unet/, scheduler/, ...)")
    text = str(spec)
    if isinstance(spec, os.PathLike) or text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise PriorLoadError(f"prior folder not found: {path}")
    return text


def _hub_error(repo: str, err: BaseException, local_files_only: bool) -> PriorLoadError:
    """One line: which id failed and why, and the two ways out (a local folder, or fixing hub access)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(err, LocalEntryNotFoundError) and local_files_only:  # HF_HUB_OFFLINE and not in the cache
        return PriorLoadError(f"could not load hub id '{repo}': no local folder of that name and not in the Hugging "
                              "Face cache, and HF_HUB_OFFLINE is set; pass a local folder (save_pretrained layout), "
                              "or unset HF_HUB_OFFLINE where the network is reachable")
    if isinstance(err, LocalEntryNotFoundError):  # what huggingface_hub raises when the Hub cannot be reached
        return PriorLoadError(f"could not load hub id '{repo}': no local folder of that name, not in the Hugging Face "
                              "cache, and the Hub could not be reached; pass a local folder (save_pretrained layout), "
                              "or check the network")
    reason = (str(err).strip().splitlines() or [""])[0][:160]
    return PriorLoadError(f"could not load hub id '{repo}' ({type(err).__name__}: {reason}); pass a local folder "
                          "(save_pretrained layout), or set HF_HUB_OFFLINE=1 to use the local cache, or check the "
                          "network")


def _from_pretrained(loader, source: str | Path, subfolder: str, **kwargs) -> Any:
    """``loader(source, subfolder=...)`` (a ``from_pretrained``/``load_config``) with one-line ``PriorLoadError``s."""
    what = getattr(loader, "__self__", loader).__name__
    if isinstance(source, Path) and not (source / subfolder).is_dir():
        raise PriorLoadError(f"prior folder {source} has no {subfolder}/ (the {what})")
    try:
        return loader(str(source), subfolder=subfolder, **kwargs)
    except Exception as err:  # hub, network, file and config errors come in many types
        if isinstance(source, str):
            raise _hub_error(source, err, kwargs.get("local_files_only", False)) from err
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        message = f"cannot load the {what} from {source / subfolder}: {type(err).__name__}: {reason}"
        raise PriorLoadError(message) from err


def _read_json(source: str | Path, filename: str, local_files_only: bool) -> dict[str, Any] | None:
    """A JSON object of the folder or hub repo, ``None`` when the file does not exist there."""
    if isinstance(source, Path):
        path = source / filename
        if not path.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            path = Path(hf_hub_download(source, filename, local_files_only=local_files_only))
        except LocalEntryNotFoundError as err:  # offline or unreachable, not cached: "absent" is unknowable
            raise _hub_error(source, err, local_files_only) from err
        except EntryNotFoundError:
            return None
        except Exception as err:  # unknown repo, network down, ...
            raise _hub_error(source, err, local_files_only) from err
    return read_json_object(path, PriorLoadError)
