"""ToyWorld's segmentation expert: Grounded-SAM's interface (image + phrases -> masks), answered exactly
by the judge's detections. A phrase is a ToyWorld noun phrase with or without its head word: "circle",
"red circles", "a big striped red circle", "two blue squares"."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from t2i_align.experts.base import ModelFreeExpert, check_images
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.world import Phrase, parse_phrase

_HEADS = ("a ", "an ", "one ", "two ", "three ", "four ")


def parse_noun_phrase(text: str) -> Phrase:
    """``text`` as a :class:`Phrase` (count ignored: the mask covers every instance)."""
    t = " ".join(text.lower().split())
    return parse_phrase(t if t.startswith(_HEADS) else f"a {t}", text)


class ToySegmenter(ModelFreeExpert):
    """Masks of the judge's detections that match each phrase (shape and every stated attribute).

    Args:
        judge: the ToyWorld judge that detects the objects (a default one when None).
    """

    def __init__(self, judge: ToyJudge | None = None) -> None:
        self.judge = judge or ToyJudge()

    def masks(self, images: torch.Tensor, phrases: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        check_images(images, phrases, "ToySegmenter")
        h, w = images.shape[-2:]
        out = []
        for detections, texts in zip(self.judge.detect_batch(images.float().cpu()), phrases):
            masks = np.zeros((len(texts), h, w), dtype=bool)
            for k, text in enumerate(texts):
                phrase = parse_noun_phrase(text)
                for d in detections:
                    if phrase.matches(d):
                        masks[k] |= d.mask
            out.append(torch.from_numpy(masks).to(images.device))
        return out


class ToyDetector(ModelFreeExpert):
    """The detector interface answered by the judge: a label is found when some detected object matches it (its
    shape and every attribute it states), the MultiGen/VISOR check on ToyWorld.

    Args:
        judge: the ToyWorld judge that detects the objects (a default one when None).
    """

    def __init__(self, judge: ToyJudge | None = None) -> None:
        self.judge = judge or ToyJudge()

    def found(self, images: torch.Tensor, labels: Sequence[Sequence[str]]) -> list[list[bool]]:
        check_images(images, labels, "ToyDetector")
        out = []
        for detections, texts in zip(self.judge.detect_batch(images.float().cpu()), labels):
            phrases = [parse_noun_phrase(t) for t in texts]
            out.append([any(p.matches(d) for d in detections) for p in phrases])
        return out
