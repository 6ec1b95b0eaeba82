"""ToyWorld's experts for the SAM reward and the fine stage: a tagger that lists the judge's detections and a
rule-based likelihood judge that reads the prompt's scene graph (and gives each tag the prompt's words for it)."""

from __future__ import annotations

from typing import Sequence

import torch

from t2i_align.experts.base import check_images
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.experts.segmenter import parse_noun_phrase
from t2i_align.toyworld.world import Phrase, parse_prompt


class ToyTagger:
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


class ToyLikelihoodJudge:
    """certain: a phrase of the prompt names the tag's shape and every attribute it states agrees;
    may: the shape is named but a stated attribute differs; unlikely: the shape is not in the prompt. A tag's
    local description is the prompt's phrase of that shape (the one agreeing on most of the tag's attributes),
    without its article or count word: "red circle" for the tag "big plain blue circle" in "a red circle ..."."""

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
        return [self.label(phrases, parse_noun_phrase(tag)) for tag in tags]

    @staticmethod
    def label(phrases: Sequence[Phrase], tag: Phrase) -> str:
        same_shape = [p for p in phrases if p.shape == tag.shape]
        if not same_shape:
            return "unlikely"
        agrees = any(all(getattr(p, a) in (None, getattr(tag, a)) for a in ("colour", "size", "texture")) for p in same_shape)
        return "certain" if agrees else "may"
