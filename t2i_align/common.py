"""Leaf helpers shared by several packages (this module imports no other t2i_align module): stable seeds,
evaluation items, image grids, the user-error base class."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch


class UserError(Exception):
    """A problem in what the user gave (a config value, a file, a model folder, a checkpoint, the environment). Its
    message is one sentence naming the key or file and what was expected; ``t2i-align`` prints it without a
    traceback. The project's own error types derive from it alongside the built-in type they always had."""


class ConfigError(UserError, ValueError):
    """A configured value is out of its allowed range (the message names the key)."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of values (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class EvalItem:
    """One image to generate: ``key`` is unique in the set; ``group`` lets subclasses aggregate (e.g. the
    ToyWorld category or the TIFA prompt id)."""

    key: str
    prompt: str
    seed: int
    group: str = ""


def image_grid(images: Sequence[torch.Tensor], columns: int = 8, gap: int = 2):
    """A PIL grid of B x 3 x H x W images in [0, 1], ``gap`` white pixels apart."""
    from PIL import Image

    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    h, w = images[0].shape[-2:]
    grid = Image.new("RGB", (columns * (w + gap), rows * (h + gap)), (255, 255, 255))
    for i, img in enumerate(images):
        arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        grid.paste(Image.fromarray(arr), ((i % columns) * (w + gap), (i // columns) * (h + gap)))
    return grid


def build_from_class_path(class_path: str, init_args: dict, what: str = "--class"):
    """An instance of ``module.Class`` (a command line's ``--segmenter``/``--detector``) with ``init_args``."""
    import importlib

    module, _, name = class_path.rpartition(".")
    if not module:
        raise ValueError(f"{what}: expected a class path like package.module.Class, got {class_path!r}")
    return getattr(importlib.import_module(module), name)(**init_args)
