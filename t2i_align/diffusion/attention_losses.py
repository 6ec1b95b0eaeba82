"""Cross-attention grounding losses: CoMat's attribute concentration and TokenCompose's token/pixel losses.

All functions take the head-averaged cross-attention map of ONE layer, ``maps: [B, h, w, T]`` (softmax over
the T text tokens already applied, conditional branch only), and per sample a list of :class:`Grounding`
(token positions into T + a binary mask at any resolution). Masks are resized to ``(h, w)`` with bilinear
interpolation, antialiased when shrinking, then ``> 0`` (TokenCompose Section 3; CoMat's code resizes with
torchvision's ``Resize(antialias=True)``): a non-empty mask never comes out empty, at the cost of lighting the
cells next to the object too. Losses are computed in float32 and return one value per sample,
``Tensor[B]``; a sample without groups gives ``0`` that stays connected to ``maps`` (its gradient is zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Empty = Literal["skip", "keep"]


@dataclass(frozen=True)
class Grounding:
    """Token positions of one noun/entity (all its tokens, attributes included for CoMat) and its mask."""

    positions: tuple[int, ...]
    mask: Tensor  # bool/0-1 [H, W], any resolution


def resize_mask(mask: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Binary mask resized to ``size``: bilinear (antialiased when shrinking), then ``> 0``; returned as a float
    0/1 tensor ``[h, w]``. Every object of a non-empty mask keeps at least one cell at any size.

    Args:
        mask: ``[H, W]`` bool or numeric mask (non-zero = inside).
        size: target ``(h, w)`` or a single int for a square.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    m = mask.float()
    if tuple(m.shape) != size:
        # Plain bilinear reads only the 2x2 input pixels nearest each output cell's centre: shrinking 8x or more,
        # small objects fall between those samples and vanish. The antialiased filter widens with the factor and
        # covers every input pixel (as torchvision's Resize(antialias=True) in CoMat's code).
        shrink = m.shape[0] > size[0] or m.shape[1] > size[1]
        m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0, 0]
    return (m > 0).float()


MaskCache = dict  # (h, w, device) -> (resized masks per sample, their emptiness per sample); see _groups


def _resized(groundings: Sequence[Sequence[Grounding]], hw: tuple[int, int], device: torch.device):
    """Every group's mask resized to ``hw`` on ``device``, and whether each is non-empty (plain bools).

    One batch of work instead of one per group: the masks are resized where they are, their emptiness read in one
    transfer (``tolist`` of one flag tensor: no sync at all for masks on the CPU, one for masks on a GPU, where a
    ``mask.any()`` branch per group cost one each), and moved to ``device`` in one copy (asynchronous from pinned
    memory to a GPU) instead of one blocking copy per group.
    """
    pairs = [(g.positions, g.mask) if isinstance(g, Grounding) else g for groups in groundings for g in groups]
    for positions, _ in pairs:
        if len(positions) == 0:
            raise ValueError("a grounding needs at least one token position")
    if not pairs:
        return [[] for _ in groundings], [[] for _ in groundings]
    masks = torch.stack([resize_mask(mask, hw).to(pairs[0][1].device) for _, mask in pairs])
    flags = masks.flatten(1).any(1).tolist()
    if masks.device != torch.device(device):
        pin = masks.device.type == "cpu" and torch.device(device).type == "cuda"
        masks = (masks.pin_memory() if pin else masks).to(device, non_blocking=pin)
    per_sample, per_flags, start = [], [], 0
    for groups in groundings:
        per_sample.append(list(masks[start:start + len(groups)]))
        per_flags.append(flags[start:start + len(groups)])
        start += len(groups)
    return per_sample, per_flags


def _groups(maps: Tensor, groundings: Sequence[Sequence[Grounding]], cache: MaskCache | None = None):
    """Per sample, its float32 map ``[h, w, T]``, a list of (token maps ``[h, w, K]``, mask ``[h, w]``) and a list of
    whether each mask is non-empty (bools, read on the host once per call: see :func:`_resized`).

    A group may also be given as a plain ``(positions, mask)`` pair. ``cache``: a dict shared by calls on maps of
    the same batch (e.g. one per layer) so that each size's masks are resized and read once per batch.
    """
    if maps.ndim != 4 or len(groundings) != maps.shape[0]:
        raise ValueError(f"maps must be [B, h, w, T] with one grounding list per sample; got "
                         f"{tuple(maps.shape)} and {len(groundings)} lists")
    h, w = maps.shape[1:3]
    key = (h, w, maps.device)
    if cache is not None and key in cache:
        masks, flags = cache[key]
    else:
        masks, flags = _resized(groundings, (h, w), maps.device)
        if cache is not None:
            cache[key] = (masks, flags)
    for a, groups, sample_masks, sample_flags in zip(maps.float(), groundings, masks, flags):
        out = []
        for g, m in zip(groups, sample_masks):
            positions = g.positions if isinstance(g, Grounding) else g[0]
            out.append((a[..., list(positions)], m))
        yield a, out, sample_flags


def _zero(a: Tensor) -> Tensor:
    return a.sum() * 0  # keeps the graph for a sample without terms


def comat_concentration(maps: Tensor, groundings: Sequence[Sequence[Grounding]], alpha: float = 1e-3,
                        beta: float = 5e-5, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """CoMat attribute concentration (paper Eq. 4 and 5): ``(L_pos, L_neg)``, each ``Tensor[B]``.

    An entity with an empty mask adds only its negative term but still counts in N (a missing object).

    Args:
        maps: head-averaged cross-attention ``[B, h, w, T]`` of one layer.
        groundings: per sample, one :class:`Grounding` per entity (noun + attribute tokens, noun mask).
        alpha: weight of the region-level term.
        beta: weight of the pixel-level term.
        eps: clamp inside the logs and of the per-token totals.
    """
    pos, neg = [], []
    for a, groups, _ in _groups(maps, groundings):
        if not groups:
            pos.append(_zero(a))
            neg.append(_zero(a))
            continue
        n_pix = a.shape[0] * a.shape[1]  # |A|
        lp, ln = 0.0, 0.0
        for tok, m in groups:
            region = (tok / tok.sum((0, 1)).clamp_min(eps)).sum(-1)  # sum_k A^k_u / sum_xy A^k_xy
            summed = tok.sum(-1)  # sum_k A^k_u
            # Eq. 4: inside the mask
            lp = lp + (m * (alpha * region + beta * summed.clamp_min(eps).log() / n_pix)).sum()
            # Eq. 5: outside the mask
            ln = ln + ((1 - m) * (-alpha * region + beta * (1 - summed).clamp_min(eps).log() / n_pix)).sum()
        pos.append(-lp / len(groups))
        neg.append(-ln / len(groups))
    return torch.stack(pos), torch.stack(neg)


def _kept(groups: list[tuple[Tensor, Tensor]], nonempty: list[bool], empty: Empty) -> list[tuple[Tensor, Tensor]]:
    if empty not in ("skip", "keep"):
        raise ValueError(f"empty must be 'skip' or 'keep', got {empty!r}")
    return [(tok, m) for (tok, m), full in zip(groups, nonempty) if empty == "keep" or full]


def token_loss(maps: Tensor, groundings: Sequence[Sequence[Grounding]], empty: Empty = "skip",
               eps: float = 1e-6, mask_cache: MaskCache | None = None) -> Tensor:
    """TokenCompose L_token (paper Eq. 5): per sample, mean over nouns of ``(1 - sum_{u in M} A / sum_u A)^2``.

    ``A`` is the sum of the noun's token maps. Returns ``Tensor[B]``.

    Args:
        maps: head-averaged cross-attention ``[B, h, w, T]`` of one layer.
        groundings: per sample, one :class:`Grounding` per noun.
        empty: ``"skip"`` drops nouns whose resized mask is empty (TokenCompose); ``"keep"`` keeps them with
            an all-zero target (CoMat's public code).
        eps: clamp of the total activation.
        mask_cache: a dict shared by the calls on one batch's maps (see :func:`_groups`).
    """
    out = []
    for a, groups, nonempty in _groups(maps, groundings, mask_cache):
        groups = _kept(groups, nonempty, empty)
        if not groups:
            out.append(_zero(a))
            continue
        terms = []
        for tok, m in groups:
            A = tok.sum(-1)  # noun map: sum of its token maps
            terms.append((1 - (A * m).sum() / A.sum().clamp_min(eps)) ** 2)
        out.append(torch.stack(terms).mean())
    return torch.stack(out)


def pixel_loss(maps: Tensor, groundings: Sequence[Sequence[Grounding]], empty: Empty = "skip",
               eps: float = 1e-6, mask_cache: MaskCache | None = None) -> Tensor:
    """TokenCompose L_pixel (paper Eq. 6): per sample, mean over nouns of the pixel-mean binary cross-entropy
    between the noun's summed token map (clamped to ``[eps, 1 - eps]``) and its mask. Returns ``Tensor[B]``.

    Args:
        maps: head-averaged cross-attention ``[B, h, w, T]`` of one layer.
        groundings: per sample, one :class:`Grounding` per noun.
        empty: ``"skip"`` or ``"keep"`` nouns whose resized mask is empty (see :func:`token_loss`).
        eps: clamp of the probabilities.
        mask_cache: a dict shared by the calls on one batch's maps (see :func:`_groups`).
    """
    out = []
    for a, groups, nonempty in _groups(maps, groundings, mask_cache):
        groups = _kept(groups, nonempty, empty)
        if not groups:
            out.append(_zero(a))
            continue
        terms = []
        for tok, m in groups:
            p = tok.sum(-1).clamp(eps, 1 - eps)
            terms.append(-(m * p.log() + (1 - m) * (1 - p).log()).mean())
        out.append(torch.stack(terms).mean())
    return torch.stack(out)
