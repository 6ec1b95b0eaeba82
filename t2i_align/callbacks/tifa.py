"""TIFA (Hu et al., 2023): question answering on generated images.

Reads TIFA's question-answer JSON (a list of ``{"id", "caption", "question", "choices", "answer",
"element_type", "element"}``), answers every question with a VQA model, snaps each free-form answer to
a choice (the literal choice if the answer is one, else the nearest by sentence-embedding cosine, as
TIFA's ``multiple_choice_vqa`` does with SBERT), and scores it 1 if that choice is the expected
answer. ``tifa_average`` is the mean over prompts of each prompt's mean question score; accuracy per
element type is over all questions of that type (TIFA's ``tifa_score_benchmark``).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from t2i_align.experts.text_embedding import Embedder

_REQUIRED = ("id", "caption", "question", "choices", "answer", "element_type")


@dataclass(frozen=True)
class TifaQuestion:
    id: str
    caption: str
    question: str
    choices: tuple[str, ...]
    answer: str
    element_type: str
    element: str = ""


def read_tifa_questions(path: str | Path) -> dict[str, list[TifaQuestion]]:
    """Questions grouped by prompt id, prompts in file order. Errors name the file, item and key."""
    path = Path(path)
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of question objects, got {type(items).__name__}")
    out: dict[str, list[TifaQuestion]] = {}
    for i, item in enumerate(items):
        missing = [k for k in _REQUIRED if k not in item] if isinstance(item, dict) else list(_REQUIRED)
        if missing:
            raise ValueError(f"{path}: item {i}: missing key(s) {missing} (TIFA question-answer format)")
        choices = tuple(str(c) for c in item["choices"])
        if str(item["answer"]) not in choices:
            raise ValueError(f"{path}: item {i} ({item['id']}): answer {item['answer']!r} is not among {choices}")
        q = TifaQuestion(str(item["id"]), item["caption"], item["question"], choices, str(item["answer"]),
                         item["element_type"], item.get("element", ""))
        out.setdefault(q.id, []).append(q)
    return out


def nearest_choice(answer: str, choices: Sequence[str], embed: Embedder | None) -> str:
    """The choice ``answer`` stands for: itself if it is one, else the most cosine-similar by ``embed``."""
    if answer in choices:
        return answer
    if embed is None:
        raise ValueError(f"free-form answer {answer!r} is not among {list(choices)} and no embedder was given")
    vectors = embed([answer, *choices])
    sims = vectors[1:] @ vectors[0]
    return choices[int(torch.argmax(sims))]  # ties: the first choice


@dataclass(frozen=True)
class ScoredQuestion:
    question: TifaQuestion
    free_form: str
    choice: str

    @property
    def score(self) -> float:
        return float(self.choice == self.question.answer)


def score_answers(questions: Sequence[TifaQuestion], free_form: Sequence[str], embed: Embedder | None) -> list[ScoredQuestion]:
    return [ScoredQuestion(q, a, nearest_choice(a, q.choices, embed)) for q, a in zip(questions, free_form, strict=True)]


def tifa_report(scored: Mapping[str, Sequence[ScoredQuestion]]) -> dict:
    """TIFA's summary: ``tifa_average``, ``tifa_stdev`` (sample stdev over prompts), ``accuracy_by_type``
    and ``caption_scores`` (per prompt id)."""
    caption_scores = {pid: sum(s.score for s in qs) / len(qs) for pid, qs in scored.items() if qs}
    by_type: dict[str, list[float]] = defaultdict(list)
    for qs in scored.values():
        for s in qs:
            by_type[s.question.element_type].append(s.score)
    values = list(caption_scores.values())
    return {
        "tifa_average": sum(values) / len(values) if values else float("nan"),
        "tifa_stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "accuracy_by_type": {t: sum(v) / len(v) for t, v in by_type.items()},
        "caption_scores": caption_scores,
    }
