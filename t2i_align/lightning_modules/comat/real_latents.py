"""The cache of CoMat's "real" latents (the frozen base model's final latents per prompt), computed ahead by
``python -m t2i_align.commands.comat_cache``.

A cache is a folder: one file per prompt, named by a short hash of its id *and* text (ids are unique only within a
prompt file, and the paper's prompt sets are numbered from 0 each), holding
``torch.save({"id", "prompt", "latents": C x h x w float32})`` (loadable with ``weights_only=True``), and
``recipe.json``: what the latents depend on (generator, sampler settings, latent shape, seed). Training refuses a
recipe that differs from its own settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from t2i_align.common import UserError

RECIPE_FILE = "recipe.json"
CACHE_COMMAND = "python -m t2i_align.commands.comat_cache"
_ENTRY_KEYS = ("id", "prompt", "latents")


class RealLatentsCacheError(UserError, ValueError):
    """A cache of real latents that cannot be used; the message names the folder or file and what to do."""


def cache_entry_name(prompt_id: str, prompt: str) -> str:
    """File name of a prompt's cached real latents: a short hash of its id and text (ids are unique only within a
    prompt file; the latents depend on both, the id through the noise seed)."""
    digest = hashlib.blake2b(repr((str(prompt_id), prompt)).encode(), digest_size=8).hexdigest()
    return f"{digest}.pt"


def fill_hint(folder: str | os.PathLike) -> str:
    return f"fill it with `{CACHE_COMMAND} {folder} --config ...` (the training run's config stack)"


def read_recipe(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``recipe.json`` of a cache folder, or None when there is none."""
    path = Path(folder) / RECIPE_FILE
    if not path.exists():
        return None
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RealLatentsCacheError(f"{path}: not a JSON recipe of cached real latents ({e})") from None
    if not isinstance(recipe, dict):
        raise RealLatentsCacheError(f"{path}: a recipe must be a JSON object, found {type(recipe).__name__}")
    return recipe


def recipe_differences(cached: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """``key: cache X, this run Y`` for every key whose values differ (or that only one side has)."""
    missing = "<missing>"
    return [f"{key}: cache {cached.get(key, missing)!r}, this run {expected.get(key, missing)!r}"
            for key in sorted(set(cached) | set(expected)) if cached.get(key, missing) != expected.get(key, missing)]


def load_cache_entry(path: Path, prompt_id: str, prompt: str, latent_shape: Sequence[int]) -> torch.Tensor:
    """The cached ``C x h x w`` float32 latents of one prompt, checked against its id, text and shape."""
    where = f"{path} (cached real latents of prompt id {prompt_id!r})"
    redo = f"delete it and rerun `{CACHE_COMMAND} {path.parent} --config ...` to recompute it"
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or objects other than tensors and containers
        raise RealLatentsCacheError(f"{where} cannot be read ({str(e).splitlines()[0][:200]}); {redo}") from None
    if not isinstance(entry, dict) or not all(k in entry for k in _ENTRY_KEYS):
        found = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise RealLatentsCacheError(f"{where} is not an entry of {list(_ENTRY_KEYS)} (found {found}); {redo}")
    if entry["id"] != str(prompt_id) or entry["prompt"] != prompt:
        raise RealLatentsCacheError(
            f"{where} holds prompt id {entry['id']!r} ({entry['prompt']!r}), not {prompt!r}; {redo}")
    latents = entry["latents"]
    is_tensor = isinstance(latents, torch.Tensor)
    if not is_tensor or not latents.is_floating_point() or list(latents.shape) != list(latent_shape):
        found = f"shape {list(latents.shape)}, {latents.dtype}" if is_tensor else type(latents).__name__
        raise RealLatentsCacheError(f"{where}: latents must be float {list(latent_shape)}, found {found}; {redo}")
    return latents.float()
