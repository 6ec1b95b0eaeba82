"""Toy metrics: does an image (as seen by the judge) satisfy its prompt?

Per image, from the prompt's :class:`~t2i_align.toyworld.world.PromptSpec` and the judge's detections:

* ``all_clauses`` — every clause holds: each phrase is matched by exactly ``count`` detections (shape and
  every stated attribute), and the relation holds between some matching pair;
* ``object_accuracy`` — named objects present with the right attributes: sum_i min(matches_i, count_i) /
  sum_i count_i;
* ``mg{k}`` — at least k of the named objects present (TokenCompose's MultiGen MG_k, here judge-based);
* ``tifa`` — fraction of scene-graph questions (:func:`questions`) the judge answers as the prompt implies.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from t2i_align.toyworld.world import Phrase, PromptSpec, relation_holds


@dataclass(frozen=True)
class Question:
    """A yes/no or count question with the answer the prompt implies; ``element`` is TIFA's element type."""

    text: str
    answer: str
    element: str  # object | color | size | texture | count | spatial
    phrase: Phrase
    other: Phrase | None = None
    relation: str | None = None


def _describe(p: Phrase) -> str:
    return " ".join(w for w in (p.colour, p.shape) if w)


def questions(spec: PromptSpec) -> list[Question]:
    """TIFA-style questions generated from the prompt's scene graph (answers all follow from the prompt)."""
    out = []
    for p in spec.phrases:
        out.append(Question(f"is there a {p.shape}?", "yes", "object", Phrase(p.shape)))
        if p.colour:
            out.append(Question(f"is there a {p.colour} {p.shape}?", "yes", "color", Phrase(p.shape, colour=p.colour)))
        if p.size:
            out.append(Question(f"is there a {p.size} {_describe(p)}?", "yes", "size", Phrase(p.shape, colour=p.colour, size=p.size)))
        if p.texture:
            q = f"is there a {p.texture} {_describe(p)}?"
            out.append(Question(q, "yes", "texture", Phrase(p.shape, colour=p.colour, texture=p.texture)))
        if p.count > 1:
            out.append(Question(f"how many {_describe(p)}s are there?", str(p.count), "count", Phrase(p.shape, colour=p.colour)))
    if spec.relation:
        a, b = spec.phrases[:2]
        out.append(Question(f"is the {_describe(a)} {spec.relation} the {_describe(b)}?", "yes", "spatial",
                            Phrase(a.shape, colour=a.colour), Phrase(b.shape, colour=b.colour), spec.relation))
    return out


def answer(question: Question, detections: Sequence) -> str:
    """The judge's answer to a generated question (detections: objects with shape/colour/size/texture/x/y)."""
    found = [d for d in detections if question.phrase.matches(d)]
    if question.element == "count":
        return str(len(found))
    if question.element == "spatial":
        others = [d for d in detections if question.other.matches(d)]
        return "yes" if any(relation_holds(question.relation, a, b) for a in found for b in others) else "no"
    return "yes" if found else "no"


def score_image(spec: PromptSpec, detections: Sequence) -> dict[str, float]:
    """All metrics of one image."""
    matches = [[d for d in detections if p.matches(d)] for p in spec.phrases]
    counts_ok = all(len(m) == p.count for m, p in zip(matches, spec.phrases))
    relation_ok = True
    if spec.relation:
        relation_ok = any(relation_holds(spec.relation, a, b) for a in matches[0] for b in matches[1])
    present = sum(min(len(m), p.count) for m, p in zip(matches, spec.phrases))
    qs = questions(spec)
    scores = {
        "all_clauses": float(counts_ok and relation_ok),
        "object_accuracy": present / spec.num_objects,
        "tifa": sum(answer(q, detections) == q.answer for q in qs) / len(qs),
    }
    for k in (2, 3, 4):
        if spec.num_objects >= k:
            scores[f"mg{k}"] = float(present >= k)
    return scores


def aggregate(results: Iterable[tuple[str, dict[str, float]]]) -> dict[str, float]:
    """Mean of each metric per category, as ``{"<category>/<metric>": value}`` plus ``"<category>/n"``."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for category, scores in results:
        counts[f"{category}/n"] += 1
        for name, value in scores.items():
            sums[f"{category}/{name}"] += value
            counts[f"{category}/{name}"] += 1
    out = {key: sums[key] / counts[key] for key in sums}
    out.update({key: float(n) for key, n in counts.items() if key.endswith("/n")})
    return dict(sorted(out.items()))
