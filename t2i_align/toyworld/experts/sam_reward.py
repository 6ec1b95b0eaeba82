"""ToyWorld's experts for the SAM reward and the fine stage: a tagger that lists the judge's detections and a
rule-based likelihood judge that reads the prompt's scene graph (and gives each tag the prompt's words for it).

The judge labels a tag by its object category (the shape) only, like FineRewards' SAM reward (Eq. 6): its code tags
the image with Tag2Text, whose tags are object categories, and asks Vicuna how likely each category is in the
scene. A wrongly coloured, sized or textured object is still "certain"; its attributes are left to the local
description (the prompt's phrase with its attributes, which RealignDiff's fine stage re-weights) and to the other
rewards. An attribute-aware label ("may" for a wrong stated attribute) made the reward prefer leaving an object out
to drawing it in the wrong colour, and made the fine stage modulate exactly those objects less (RealignDiff Eq. 9);
it is kept behind ``attributes=True`` for ablations.

Both hold no model (the judge runs numpy on the CPU): their ``to(device)`` moves nothing
(:class:`~t2i_align.experts.base.ModelFreeExpert`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from t2i_align.experts.base import ModelFreeExpert, check_images
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.experts.segmenter import parse_noun_phrase
from t2i_align.toyworld.world import Phrase, parse_prompt


class ToyTagger(ModelFreeExpert):
    """One tag per detected object, "<size> <texture> <colour> <shape>" (e.g. "big striped red circle").

    Args:
        judge: the ToyWorld judge that detects the objects (a default one when None).
    """

    def __init__(self, judge: ToyJudge | None = None) -> None:
        self.judge = judge or ToyJudge()

    def tags(self, images: torch.Tensor) -> list[list[str]]:
        check_images(images, list(images), "ToyTagger")
        return [[f"{d.size} {d.texture} {d.colour} {d.shape}" for d in found]
                for found in self.judge.detect_batch(images.float().cpu())]


class ToyLikelihoodJudge(ModelFreeExpert):
    """certain: a phrase of the prompt names the tag's shape (its category); unlikely: the shape is not in the
    prompt. A tag's local description is the prompt's phrase of that shape (the one agreeing on most of the tag's
    attributes), without its article or count word: "red circle" for the tag "big plain blue circle" in
    "a red circle ...".

    Args:
        attributes: the former, attribute-aware label (for ablations): "may" when the shape is named but every
            phrase of that shape states a colour, size or texture that differs from the tag's.
    """

    def __init__(self, attributes: bool = False) -> None:
        self.attributes = attributes

    def describe(self, prompt: str, tags: Sequence[str]) -> list[str | None]:
        phrases = parse_prompt(prompt).phrases
        out = []
        for tag in map(parse_noun_phrase, tags):
            same_shape = [p for p in phrases if p.shape == tag.shape]
            if not same_shape:
                out.append(None)
                continue
            best = max(same_shape, key=lambda p: sum(getattr(p, a) == getattr(tag, a) for a in ("colour", "size", "texture")))
            out.append(best.text().split(" ", 1)[1])
        return out

    def __call__(self, prompt: str, tags: Sequence[str]) -> list[str]:
        phrases = parse_prompt(prompt).phrases
        return [self.label(phrases, parse_noun_phrase(tag), self.attributes) for tag in tags]

    @staticmethod
    def label(phrases: Sequence[Phrase], tag: Phrase, attributes: bool = False) -> str:
        same_shape = [p for p in phrases if p.shape == tag.shape]
        if not same_shape:
            return "unlikely"
        if not attributes:
            return "certain"
        agrees = any(all(getattr(p, a) in (None, getattr(tag, a)) for a in ("colour", "size", "texture")) for p in same_shape)
        return "certain" if agrees else "may"
