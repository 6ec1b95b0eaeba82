"""Load the parts of a diffusers Stable Diffusion 1.x/2.x pipeline from a local folder or a hub id."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from t2i_align.common import UserError

SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


class ModelLoadError(UserError, RuntimeError):
    """A pipeline could not be loaded; the message says from where and what to do."""


@dataclass
class SDComponents:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler_config: dict


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


def load_sd_components(
    source: str, revision: str | None = None, variant: str | None = None, dtype: torch.dtype = torch.float32
) -> SDComponents:
    """Load tokenizer, text encoder, VAE, UNet and scheduler config of an SD pipeline.

    ``source`` is a local diffusers folder (``model_index.json`` with the five subfolders) or a hub id
    such as ``stable-diffusion-v1-5/stable-diffusion-v1-5``. Hub ids need network access (or a filled
    Hugging Face cache); without it the error says so and suggests a local folder.
    """
    source = resolve_pretrained(source, "Stable Diffusion pipeline", revision)
    local = Path(source)
    if local.exists():
        missing = [sub for sub in SUBFOLDERS if not (local / sub).is_dir()]
        if missing:
            raise ModelLoadError(
                f"'{source}' is not a diffusers Stable Diffusion folder: missing subfolder(s) {missing} "
                f"(expected {list(SUBFOLDERS)})"
            )
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
