"""ToyWorld's segmentation expert: Grounded-SAM's interface (image + phrases -> masks), answered exactly
by the judge's detections. A phrase is a ToyWorld noun phrase with or without its head word: "circle",
"red circles", "a big striped red circle", "two blue squares"."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from t2i_align.experts.base import ModelFreeExpert, check_images
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.world import COLOURS, SIZES, TEXTURES, Phrase, parse_phrase

_HEADS = ("a ", "an ", "one ", "two ", "three ", "four ")
_ATTRIBUTE_FIELDS = {**dict.fromkeys(COLOURS, "colour"), **dict.fromkeys(SIZES, "size"),
                     **dict.fromkeys(TEXTURES, "texture")}  # word -> the Obj field it states


def parse_noun_phrase(text: str) -> Phrase:
    """``text`` as a :class:`Phrase` (count ignored: the mask covers every instance)."""
    t = " ".join(text.lower().split())
    return parse_phrase(t if t.startswith(_HEADS) else f"a {t}", text)


def phrase_matcher(text: str) -> Callable[[object], bool]:
    """Which detections the segmenter's ``text`` names, as an open-vocabulary segmenter would read it: a ToyWorld
    noun phrase (:func:`parse_noun_phrase`); attribute words alone ("cyan": spaCy's small model makes the colour the
    noun of "a striped cyan square above ...", see ``t2i_align.experts.entities``) name every object with those
    attributes; anything else names nothing (an empty mask, never an error in the middle of a training run)."""
    try:
        return parse_noun_phrase(text).matches
    except ValueError:
        pass
    words = text.lower().split()
    wanted = {_ATTRIBUTE_FIELDS[w]: w for w in words if w in _ATTRIBUTE_FIELDS}
    if not words or len(wanted) != len(words):
        return lambda detection: False
    return lambda detection: all(getattr(detection, field) == word for field, word in wanted.items())


class ToySegmenter(ModelFreeExpert):
    """Masks of the judge's detections that match each phrase (shape and every stated attribute; how a phrase is
    read: ``phrase_matcher``).

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
                matches = phrase_matcher(text)
                for d in detections:
                    if matches(d):
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
