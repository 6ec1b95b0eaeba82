"""Checks shared by every expert: images cross into an expert as float ``B x 3 x H x W`` in [0, 1]."""

from __future__ import annotations

from typing import Sized

import torch


def check_images(images: torch.Tensor, per_image: Sized, who: str) -> None:
    """Raise a ``ValueError`` naming ``who`` unless ``images`` is a float batch in [0, 1] with one entry
    of ``per_image`` (texts, phrase lists, ...) per image."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{who}: expected images B x 3 x H x W, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{who}: expected float images in [0, 1], got {images.dtype}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        lo, hi = images.min().item(), images.max().item()
        raise ValueError(f"{who}: expected images in [0, 1], got values in [{lo:.3g}, {hi:.3g}] (a [-1, 1] batch?)")
    if len(per_image) != len(images):
        raise ValueError(f"{who}: {len(images)} images but {len(per_image)} text entries")
