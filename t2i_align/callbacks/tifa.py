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
from typing import Callable, Mapping, Sequence

import torch

from t2i_align.callbacks.evaluation import EvalItem, GenerativeEvaluation
from t2i_align.common import derive_seed
from t2i_align.experts.text_embedding import Embedder
from t2i_align.experts.vqa import BlipVQA, VQAModel

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
    """The choice ``answer`` stands for: itself if it is one, else the most cosine-similar by ``embed``.
    Without an embedder (exact VQA models such as ToyWorld's judge) a non-choice answer stays as it is,
    so it scores 0."""
    if answer in choices or embed is None:
        return answer
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


class TIFAEvaluation(GenerativeEvaluation):
    """TIFA during training: generate each caption of a TIFA question file, answer its questions with a
    VQA model, and log ``tifa_<vqa>/average`` and ``tifa_<vqa>/<element type>`` (accuracy per type).

    The sampler arguments are :class:`~t2i_align.callbacks.evaluation.GenerativeEvaluation`'s; its ``prompts`` is
    unused (the captions come from ``questions``).

    Args:
        questions: TIFA question-answer JSON (e.g. ``tifa_v1.0_question_answers.json``; ToyWorld's build
            writes ``prompts/eval_tifa.json``).
        vqa: the VQA model (``class_path``): default ``t2i_align.experts.vqa.BlipVQA``; ToyWorld uses
            ``t2i_align.toyworld.experts.vqa.ToyVQA``.
        embedder: snaps free-form answers to choices (``t2i_align.experts.text_embedding.SentenceEmbedder``);
            None: answers that are not a choice score 0.
        limit: evaluate only the first N prompts of the file.
    """

    expert_attributes = ("vqa", "embedder")  # moved to the module's device by run()

    def __init__(self, questions: str, vqa: VQAModel | None = None, embedder: Callable | None = None,
                 limit: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.questions_path = questions
        self.questions = dict(list(read_tifa_questions(questions).items())[:limit])
        self.types = sorted({q.element_type for qs in self.questions.values() for q in qs})
        self.vqa = vqa if vqa is not None else BlipVQA()
        self.embedder = embedder
        self.name = f"tifa_{getattr(self.vqa, 'tag', type(self.vqa).__name__.lower())}"

    def load_items(self) -> list[EvalItem]:
        return [EvalItem(f"tifa/{pid}/{k}", qs[0].caption, derive_seed(self.seed, "tifa", pid, k) % (2**31), pid)
                for pid, qs in self.questions.items() for k in range(self.images_per_prompt)]

    def settings(self) -> dict:
        return {**super().settings(), "questions": self.questions_path, "vqa": type(self.vqa).__name__,
                "embedder": type(self.embedder).__name__ if self.embedder else None}

    def reset(self, pl_module) -> None:
        # [sum of image scores, images, per-type correct..., per-type questions...]
        self.totals = torch.zeros(2 + 2 * len(self.types), dtype=torch.float64)

    def update(self, images: torch.Tensor, items: Sequence[EvalItem], pl_module) -> list[dict]:
        owners = [(i, q) for i, item in enumerate(items) for q in self.questions[item.group]]
        answers = self.vqa.answer(images[[i for i, _ in owners]], [q.question for _, q in owners])
        scored = score_answers([q for _, q in owners], answers, self.embedder)
        per_image: list[list[float]] = [[] for _ in items]
        for (i, q), s in zip(owners, scored):
            per_image[i].append(s.score)
            t = self.types.index(q.element_type)
            self.totals[2 + t] += s.score
            self.totals[2 + len(self.types) + t] += 1
        scores = [sum(v) / len(v) for v in per_image]
        self.totals[0] += sum(scores)
        self.totals[1] += len(scores)
        return [{"tifa": s} for s in scores]

    def compute(self, trainer, pl_module) -> dict[str, float]:
        totals = trainer.strategy.reduce(self.totals.to(pl_module.device), reduce_op="sum").cpu()
        n = len(self.types)
        out = {f"{self.name}/average": float(totals[0] / totals[1])}
        for t, name in enumerate(self.types):
            if totals[2 + n + t] > 0:
                out[f"{self.name}/{name}"] = float(totals[2 + t] / totals[2 + n + t])
        return out
