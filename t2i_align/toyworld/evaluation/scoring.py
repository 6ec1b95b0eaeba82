"""Judge-based evaluation of a generator on ToyWorld prompt sets.

Items are :class:`~t2i_align.callbacks.evaluation.EvalItem` with the category as ``group`` and fixed
seeds, so every run and every method is scored on the same noise. Scores are kept as per-(category,
metric) sums and counts, which add up across ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from t2i_align.common import EvalItem, derive_seed
from t2i_align.datamodules.prompts import read_prompts
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.evaluation.metrics import clause_verdicts, score_image
from t2i_align.toyworld.splits import EVAL_CATEGORIES
from t2i_align.toyworld.world import parse_prompt

METRICS = ("all_clauses", "object_accuracy", "object_missing", "attribute_wrong", "tifa", "mg2", "mg3", "mg4")


def load_items(prompts_dir: str | Path, categories: Sequence[str] | None = None, per_category: int | None = None,
               images_per_prompt: int = 1, seed: int = 0) -> list[EvalItem]:
    """Items from ``<prompts_dir>/<category>.txt`` (the layout written by ``commands.toyworld_build``: prompts/eval)."""
    items = []
    for category in categories or EVAL_CATEGORIES:
        prompts = read_prompts(Path(prompts_dir) / f"{category}.txt", format="txt")[:per_category]
        for p in prompts:
            for k in range(images_per_prompt):
                items.append(EvalItem(f"{category}/{p.id}/{k}", p.text, derive_seed(seed, category, p.id, k) % (2**31),
                                      category))
    return items


def metric_keys(categories: Sequence[str]) -> list[str]:
    """Fixed key order of the sums/counts vectors (identical on every rank)."""
    return [f"{c}/{m}" for c in categories for m in METRICS]


def score_batch(images: torch.Tensor, items: Sequence[EvalItem], judge: ToyJudge) -> list[dict[str, float]]:
    """The toy metrics of each image (float ``B x 3 x H x W`` in [0, 1]) for its item's prompt."""
    return [record["scores"] for record in judge_records(images, items, judge)]


def judge_records(images: torch.Tensor, items: Sequence[EvalItem], judge: ToyJudge) -> list[dict]:
    """Per image: its item (key, category, prompt, seed), the toy metrics and each clause's verdict."""
    records = []
    for item, found in zip(items, judge.detect_batch(images.float().cpu())):
        spec = parse_prompt(item.prompt)
        records.append({"key": item.key, "category": item.group, "prompt": item.prompt, "seed": item.seed,
                        "scores": score_image(spec, found), "clauses": clause_verdicts(spec, found)})
    return records


def accumulate(sums: torch.Tensor, counts: torch.Tensor, keys: list[str], items: Sequence[EvalItem],
               scores: Sequence[dict[str, float]]) -> None:
    """Add per-image scores into the (sums, counts) vectors over ``keys`` (``<category>/<metric>``)."""
    index = {k: i for i, k in enumerate(keys)}
    for item, item_scores in zip(items, scores):
        for name, value in item_scores.items():
            sums[index[f"{item.group}/{name}"]] += value
            counts[index[f"{item.group}/{name}"]] += 1


@torch.no_grad()
def score_items(model, items: Sequence[EvalItem], judge: ToyJudge, keys: list[str], batch_size: int = 16,
                keep_images: int = 0, sampling: SamplingSettings | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Generate with ``model.sample`` (an :class:`~t2i_align.lightning_modules.AlignmentModule`, or a bare
    :class:`~t2i_align.diffusion.generator.Generator` for a base pipeline) and judge ``items``; returns (sums,
    counts) over ``keys`` and up to ``keep_images`` (image, item, scores) triples for sample grids."""
    sums, counts = torch.zeros(len(keys), dtype=torch.float64), torch.zeros(len(keys), dtype=torch.float64)
    kept = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        images = model.sample([it.prompt for it in batch], [it.seed for it in batch], sampling).images
        scores = score_batch(images, batch, judge)
        accumulate(sums, counts, keys, batch, scores)
        kept += [(image.cpu(), item, s) for image, item, s in zip(images, batch, scores)][:keep_images - len(kept)]
    return sums, counts, kept


def summarise(keys: list[str], sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Per-category means plus the mean over categories of each metric (``<metric>`` without prefix)."""
    out = {k: float(s / c) for k, s, c in zip(keys, sums, counts) if c > 0}
    for metric in METRICS:
        values = [v for k, v in out.items() if k.endswith(f"/{metric}")]
        if values:
            out[metric] = sum(values) / len(values)
    return out
