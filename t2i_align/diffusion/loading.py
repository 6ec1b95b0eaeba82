"""Load the parts of a diffusers Stable Diffusion 1.x/2.x or SDXL pipeline from a local folder or a hub id."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from t2i_align.common import UserError

SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
XL_SUBFOLDERS = ("tokenizer_2", "text_encoder_2")  # SDXL's second tokenizer and text encoder (OpenCLIP bigG)


class ModelLoadError(UserError, RuntimeError):
    """A pipeline could not be loaded; the message says from where and what to do."""


@dataclass
class SDComponents:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler_config: dict
    # SDXL only: the second tokenizer and text encoder (its pooled, projected output is the UNet's added condition)
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    pipeline_config: dict | None = None  # model_index.json (e.g. SDXL's force_zeros_for_empty_prompt)

    @property
    def is_xl(self) -> bool:
        return self.text_encoder_2 is not None


# huggingface_hub's repo-id rule: "name" or "namespace/name" of letters, digits, "-", "_" and "."
_HUB_ID = re.compile(r"^[\w\-.]+(/[\w\-.]+)?$")
_TRUE = {"1", "on", "yes", "true"}  # huggingface_hub.constants._is_true


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: hub ids load from the local cache only."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_pretrained(source: str | os.PathLike, what: str = "model", revision: str | None = None) -> str:
    """``source`` as a loadable ``from_pretrained`` argument: an existing folder (as given, ``~`` expanded) or a hub
    id. Fails in one sentence, before any loader runs, when it is neither: a path that looks local (absolute, ``./``,
    ``~``, more than one ``/``) but does not exist, or a hub id that is not in the cache while offline."""
    text = str(source)
    local = Path(text).expanduser()
    if local.exists():
        return str(local)
    if text.startswith((".", "~", os.sep)) or not _HUB_ID.match(text):
        raise ModelLoadError(f"{what} '{text}': no such folder")
    if hub_offline():
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(text, revision=revision, local_files_only=True)
        except (OSError, ValueError):
            raise ModelLoadError(
                f"{what} '{text}' is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set: "
                f"pass a local folder (download it where there is network: `hf download {text} --local-dir DIR`)"
            ) from None
    return text


def _scheduler_config(source: str, revision: str | None) -> dict:
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler.load_config(source, subfolder="scheduler", revision=revision))


def pipeline_index(source: str, revision: str | None = None) -> dict | None:
    """The pipeline's ``model_index.json`` (local folder, cache or hub), or None where there is none."""
    from diffusers.configuration_utils import ConfigMixin

    class _Index(ConfigMixin):
        config_name = "model_index.json"

    try:
        return dict(_Index.load_config(source, revision=revision))
    except (OSError, ValueError):  # no model_index.json: an SD folder laid out by hand, checked below
        return None


def is_sdxl_index(index: dict | None) -> bool:
    """An SDXL pipeline: ``StableDiffusionXL*`` as ``_class_name``, or a second text encoder listed (a component
    entry is ``[library, class]``, ``[null, null]`` where the pipeline has none)."""
    if not index:
        return False
    entry = index.get("text_encoder_2")
    return "XL" in str(index.get("_class_name", "")) or (isinstance(entry, (list, tuple)) and entry[0] is not None)


def _refuse_refiner(source: str, index: dict | None) -> None:
    entry = (index or {}).get("text_encoder")
    if is_sdxl_index(index) and isinstance(entry, (list, tuple)) and entry[0] is None:
        raise ModelLoadError(f"'{source}' has no text_encoder (an SDXL refiner?): load the SDXL base pipeline "
                             "(e.g. stabilityai/stable-diffusion-xl-base-1.0); the refiner is not used")


def xl_vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an SDXL VAE is loaded in: float32 under float16 weights, since SDXL's VAE overflows in float16 and
    runs in float32 then (``force_upcast``; the generator casts an fp16-fixed VAE back to float16)."""
    return torch.float32 if dtype == torch.float16 else dtype


def load_vae(source: str, revision: str | None = None, variant: str | None = None,
             dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """An ``AutoencoderKL`` on its own (``GeneratorConfig.vae``: e.g. madebyollin/sdxl-vae-fp16-fix, SDXL's VAE
    fine-tuned to stay finite in float16): a model folder or hub id with ``config.json`` at its root, or a pipeline
    folder with a ``vae/`` subfolder."""
    source = resolve_pretrained(source, "VAE", revision)
    local = Path(source)
    subfolder = "vae" if local.exists() and not (local / "config.json").exists() and (local / "vae").is_dir() else None
    try:
        return AutoencoderKL.from_pretrained(source, subfolder=subfolder, revision=revision, variant=variant,
                                             torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the VAE '{source}': {err}") from err


def load_sd_components(
    source: str, revision: str | None = None, variant: str | None = None, dtype: torch.dtype = torch.float32
) -> SDComponents:
    """Load tokenizer(s), text encoder(s), VAE, UNet and scheduler config of an SD 1.x/2.x or SDXL pipeline.

    ``source`` is a local diffusers folder (``model_index.json`` with the five subfolders, SDXL's two more) or a hub
    id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` or ``stabilityai/stable-diffusion-xl-base-1.0``.
    SDXL is recognised by its ``model_index.json`` (``StableDiffusionXLPipeline``, or a ``text_encoder_2`` entry);
    the refiner is not needed. Hub ids need network access (or a filled Hugging Face cache); without it the error
    says so and suggests a local folder.
    """
    source = resolve_pretrained(source, "Stable Diffusion pipeline", revision)
    local = Path(source)
    index = pipeline_index(source, revision)
    _refuse_refiner(source, index)
    xl = is_sdxl_index(index) or (local.exists() and (local / "text_encoder_2").is_dir())
    if local.exists():
        missing = [sub for sub in SUBFOLDERS + (XL_SUBFOLDERS if xl else ()) if not (local / sub).is_dir()]
        if missing:
            raise ModelLoadError(
                f"'{source}' is not a diffusers Stable Diffusion folder: missing subfolder(s) {missing} "
                f"(expected {list(SUBFOLDERS + (XL_SUBFOLDERS if xl else ()))})"
            )
    try:
        xl_parts = {}
        if xl:
            xl_parts = {
                "tokenizer_2": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", revision=revision),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                    source, subfolder="text_encoder_2", revision=revision, variant=variant, dtype=dtype
                ),
                "pipeline_config": index or {},
            }
        return SDComponents(
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision),
            text_encoder=CLIPTextModel.from_pretrained(
                source, subfolder="text_encoder", revision=revision, variant=variant, dtype=dtype
            ),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision, variant=variant,
                                              torch_dtype=xl_vae_dtype(dtype) if xl else dtype),
            unet=UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", revision=revision, variant=variant, torch_dtype=dtype
            ),
            scheduler_config=_scheduler_config(source, revision),
            **xl_parts,
        )
    except (OSError, ValueError) as err:
        if local.exists():
            raise ModelLoadError(f"could not load the Stable Diffusion folder '{source}': {err}") from err
        raise ModelLoadError(
            f"could not load '{source}': it is not a local folder, and fetching it from the Hugging Face Hub "
            f"failed ({type(err).__name__}). Without network access hub ids cannot be downloaded: download "
            f"the model on a machine with network (e.g. `hf download {source} --local-dir /path/to/model`) "
            f"and pass that local folder instead."
        ) from err
