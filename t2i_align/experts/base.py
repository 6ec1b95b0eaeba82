"""What every expert shares: images cross into an expert as float ``B x 3 x H x W`` in [0, 1]; an expert that holds
models is an :class:`ExpertModule`, so ``.to(device)`` moves all of them."""

from __future__ import annotations

from typing import Any, Iterable, Sized

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


class ModelFreeExpert:
    """Base of the experts that hold no model (ToyWorld's rule-based experts, numpy on the CPU): ``to(device)`` has
    nothing to move and answers ``self``, so every expert can be moved the same way; their outputs follow the input
    images' device."""

    def to(self, *args: Any, **kwargs: Any) -> ModelFreeExpert:
        return self


def move_plain_parts(parts: Iterable[Any], *args: Any, **kwargs: Any) -> None:
    """``part.to(*args, **kwargs)`` for each part of a composite expert that is not an ``nn.Module`` (those are
    submodules, already moved) but has its own ``to``; parts without one hold no model."""
    for part in parts:
        if not isinstance(part, torch.nn.Module) and callable(getattr(part, "to", None)):
            part.to(*args, **kwargs)


class ExpertModule(torch.nn.Module):
    """Base of the experts that hold models (captioners, detectors, segmenters, language models): an ``nn.Module``
    whose models are submodules, so ``.to(device)`` moves every one of them, and so does ``.to`` of a composite
    that holds the expert (a reward's tagger and judge, a tagger's detector). A method keeps its experts in
    :class:`~t2i_align.lightning_modules.base.FrozenExperts`, which :class:`AlignmentModule` moves to the module's
    device when fit, validate, test or predict start, on every rank; a constructor's ``device`` only places an
    expert used on its own. Frozen: it stays in eval mode whatever ``train()`` asks (dropout off)."""

    def train(self, mode: bool = True) -> ExpertModule:
        return super().train(False)
