"""Toy metrics: does an image (as seen by the judge) satisfy its prompt?

Per image, from the prompt's :class:`~t2i_align.toyworld.world.PromptSpec` and the judge's detections:

* ``all_clauses`` — every clause holds: each phrase is matched by exactly ``count`` detections (shape and
  every stated attribute), and the relation holds between some matching pair;
* ``object_accuracy`` — named objects present with the right attributes: sum_i min(matches_i, count_i) /
  sum_i count_i;
* ``mg{k}`` — at least k of the named objects present (TokenCompose's MultiGen MG_k, here judge-based);
* ``tifa`` — fraction of scene-graph questions (:func:`questions`) the judge answers as the prompt implies;
* ``object_missing`` / ``attribute_wrong`` — the named objects whose shape is absent / whose shape is there
  but not with the stated colour, size or texture (with ``object_accuracy`` they add up to 1): they tell
  "the object was not drawn" apart from "it was drawn wrong".

:func:`clause_verdicts` gives the same judgement clause by clause, for per-image reports.
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


def _phrase_counts(p: Phrase, spec: PromptSpec, detections: Sequence) -> tuple[int, int, int]:
    """(right, drawn with a wrong attribute, missing) among the ``p.count`` objects of phrase ``p``. An object
    of ``p``'s shape counts as a wrongly drawn ``p`` only if it fits no phrase of the prompt (in "a red circle
    and a blue circle" without a red one, the blue circle is the second phrase's, and the red one is missing)."""
    right = min(sum(p.matches(d) for d in detections), p.count)
    unexplained = sum(d.shape == p.shape and not any(q.matches(d) for q in spec.phrases) for d in detections)
    wrong = min(unexplained, p.count - right)
    return right, wrong, p.count - right - wrong


def clause_verdicts(spec: PromptSpec, detections: Sequence) -> list[dict]:
    """Each clause of the prompt with the judge's verdict. A phrase is ``ok`` (exactly ``count`` matching
    objects), ``too_many``, ``missing`` (no object of its shape at all), ``wrong_attribute`` (some of its
    objects drawn in the shape but with another colour, size or texture) or ``too_few``; with the numbers
    ``right`` / ``wrong_attribute`` / ``missing`` of its ``count`` objects. The relation is ``ok``,
    ``objects_missing`` (no matching pair to relate) or ``wrong_relation``."""
    out = []
    for p in spec.phrases:
        right, wrong, missing = _phrase_counts(p, spec, detections)
        n = sum(p.matches(d) for d in detections)
        verdict = ("ok" if n == p.count else "too_many" if n > p.count else "missing" if missing == p.count
                   else "wrong_attribute" if wrong else "too_few")
        out.append({"clause": p.text(), "verdict": verdict, "right": right, "wrong_attribute": wrong,
                    "missing": missing})
    if spec.relation:
        a, b = spec.phrases[:2]
        first, second = [d for d in detections if a.matches(d)], [d for d in detections if b.matches(d)]
        holds = any(relation_holds(spec.relation, x, y) for x in first for y in second)
        verdict = "ok" if holds else "objects_missing" if not (first and second) else "wrong_relation"
        out.append({"clause": spec.relation, "verdict": verdict})
    return out


def score_image(spec: PromptSpec, detections: Sequence) -> dict[str, float]:
    """All metrics of one image."""
    matches = [[d for d in detections if p.matches(d)] for p in spec.phrases]
    counts_ok = all(len(m) == p.count for m, p in zip(matches, spec.phrases))
    relation_ok = True
    if spec.relation:
        relation_ok = any(relation_holds(spec.relation, a, b) for a in matches[0] for b in matches[1])
    per_phrase = [_phrase_counts(p, spec, detections) for p in spec.phrases]
    present = sum(right for right, _, _ in per_phrase)
    qs = questions(spec)
    scores = {
        "all_clauses": float(counts_ok and relation_ok),
        "object_accuracy": present / spec.num_objects,
        "object_missing": sum(missing for _, _, missing in per_phrase) / spec.num_objects,
        "attribute_wrong": sum(wrong for _, wrong, _ in per_phrase) / spec.num_objects,
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
