"""Checks shared by every expert: images cross into an expert as float ``B x 3 x H x W`` in [0, 1]."""

from __future__ import annotations

from typing import Sized

import torch
import torch.nn.functional as F


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


def expert_pixels(images: torch.Tensor, size: int, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float images in [0, 1] -> an expert's input: bicubic (antialiased) resize to ``size`` x ``size`` and
    the expert's mean/std normalisation. Differentiable: no round trip through PIL or uint8 (as CoMat's code
    feeds BLIP: CaraJ7/CoMat, concept_mat_utils/caption_blip.py, a tensor Resize + Normalize)."""
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x - m) / s).to(dtype)
