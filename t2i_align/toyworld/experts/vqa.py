"""ToyWorld's VQA model: the judge answers the scene-graph questions of :func:`metrics.questions`
("is there a red circle?", "how many blue squares are there?", "is the red circle above the blue
square?") with the VQA expert interface (images + questions -> free-form answers)."""

from __future__ import annotations

import re
from typing import Sequence

import torch

from t2i_align.experts.base import ModelFreeExpert, check_images
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.experts.segmenter import parse_noun_phrase
from t2i_align.toyworld.world import RELATIONS, relation_holds

_EXISTS = re.compile(r"^is there (?:a|an) (?P<phrase>.+)\?$")
_COUNT = re.compile(r"^how many (?P<phrase>.+?)s are there\?$")
_RELATION = re.compile(r"^is the (?P<a>.+?) (?P<rel>" + "|".join(RELATIONS) + r") the (?P<b>.+)\?$")


class ToyVQA(ModelFreeExpert):
    """Answers ToyWorld questions from the judge's detections; "unknown" for a question it cannot parse.

    Args:
        judge: the ToyWorld judge that detects the objects (a default one when None).
    """

    tag = "toyjudge"

    def __init__(self, judge: ToyJudge | None = None) -> None:
        self.judge = judge or ToyJudge()

    def answer(self, images: torch.Tensor, questions: Sequence[str]) -> list[str]:
        check_images(images, questions, "ToyVQA")
        return [self._answer(found, q) for found, q in zip(self.judge.detect_batch(images.float().cpu()), questions)]

    @staticmethod
    def _answer(found, question: str) -> str:
        q = " ".join(question.lower().split())
        if m := _RELATION.match(q):
            a, b = parse_noun_phrase(m["a"]), parse_noun_phrase(m["b"])
            holds = any(relation_holds(m["rel"], x, y) for x in found if a.matches(x) for y in found if b.matches(y))
            return "yes" if holds else "no"
        if m := _COUNT.match(q):
            phrase = parse_noun_phrase(m["phrase"])
            return str(sum(phrase.matches(d) for d in found))
        if m := _EXISTS.match(q):
            phrase = parse_noun_phrase(m["phrase"])
            return "yes" if any(phrase.matches(d) for d in found) else "no"
        return "unknown"
