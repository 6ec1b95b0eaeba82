"""The segmentation-expert interface (Grounded-SAM's role in TokenCompose and CoMat's mixed latents).

A segmenter's ``masks`` maps images and, per image, a list of phrases to one boolean mask per phrase: the union of
every instance the phrase names (an all-False mask when there is none). Implementations: the exact
ToyWorld segmenter (:class:`t2i_align.toyworld.experts.segmenter.ToySegmenter`) and Grounded-SAM
(:mod:`t2i_align.experts.grounded_sam`).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class Segmenter(Protocol):
    def masks(self, images: torch.Tensor, phrases: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """``images``: ``B x 3 x H x W`` in [0, 1]; ``phrases[i]``: the phrases of image ``i``.
        Returns, per image, a bool tensor ``len(phrases[i]) x H x W``."""
        ...

