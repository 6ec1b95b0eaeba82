"""Load the parts of a diffusers Stable Diffusion 1.x/2.x pipeline from a local folder or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


class ModelLoadError(RuntimeError):
    """A pipeline could not be loaded; the message says from where and what to do."""


@dataclass
class SDComponents:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler_config: dict


def _scheduler_config(source: str, revision: str | None) -> dict:
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler.load_config(source, subfolder="scheduler", revision=revision))


def load_sd_components(
    source: str, revision: str | None = None, variant: str | None = None, dtype: torch.dtype = torch.float32
) -> SDComponents:
    """Load tokenizer, text encoder, VAE, UNet and scheduler config of an SD pipeline.

    ``source`` is a local diffusers folder (``model_index.json`` with the five subfolders) or a hub id
    such as ``stable-diffusion-v1-5/stable-diffusion-v1-5``. Hub ids need network access (or a filled
    Hugging Face cache); without it the error says so and suggests a local folder.
    """
    local = Path(source).expanduser()
    if local.exists():
        missing = [sub for sub in SUBFOLDERS if not (local / sub).is_dir()]
        if missing:
            raise ModelLoadError(
                f"'{source}' is not a diffusers Stable Diffusion folder: missing subfolder(s) {missing} "
                f"(expected {list(SUBFOLDERS)})"
            )
        source = str(local)
    try:
        return SDComponents(
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision),
            text_encoder=CLIPTextModel.from_pretrained(
                source, subfolder="text_encoder", revision=revision, variant=variant, dtype=dtype
            ),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision, variant=variant, torch_dtype=dtype),
            unet=UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", revision=revision, variant=variant, torch_dtype=dtype
            ),
            scheduler_config=_scheduler_config(source, revision),
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
