"""Judge-based evaluation of a generator on ToyWorld prompt sets.

Items are (category, prompt, seed) triples with fixed seeds, so every run and every method is scored on
the same noise. Scores are kept as per-(category, metric) sums and counts, which add up across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from t2i_align.datamodules.prompts import read_prompts
from t2i_align.lightning_modules.base import derive_seed
from t2i_align.toyworld.judge import ToyJudge
from t2i_align.toyworld.metrics import score_image
from t2i_align.toyworld.splits import EVAL_CATEGORIES
from t2i_align.toyworld.world import parse_prompt

METRICS = ("all_clauses", "object_accuracy", "tifa", "mg2", "mg3", "mg4")


@dataclass(frozen=True)
class EvalItem:
    category: str
    prompt: str
    seed: int


def load_items(prompts_dir: str | Path, categories: Sequence[str] | None = None, per_category: int | None = None,
               images_per_prompt: int = 1, seed: int = 0) -> list[EvalItem]:
    """Items from ``<prompts_dir>/<category>.txt`` (the layout written by ``toyworld.build``: prompts/eval)."""
    items = []
    for category in categories or EVAL_CATEGORIES:
        prompts = read_prompts(Path(prompts_dir) / f"{category}.txt", format="txt")[:per_category]
        for p in prompts:
            for k in range(images_per_prompt):
                items.append(EvalItem(category, p.text, derive_seed(seed, category, p.id, k) % (2**31)))
    return items


def metric_keys(categories: Sequence[str]) -> list[str]:
    """Fixed key order of the sums/counts vectors (identical on every rank)."""
    return [f"{c}/{m}" for c in categories for m in METRICS]


@torch.no_grad()
def score_items(generator, items: Sequence[EvalItem], judge: ToyJudge, keys: list[str], batch_size: int = 16,
                keep_images: int = 0, **sample_kwargs) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Generate and judge ``items``; returns (sums, counts) over ``keys`` and up to ``keep_images``
    (image, item, scores) triples for sample grids."""
    index = {k: i for i, k in enumerate(keys)}
    sums, counts = torch.zeros(len(keys), dtype=torch.float64), torch.zeros(len(keys), dtype=torch.float64)
    kept = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        images = generator.sample([it.prompt for it in batch], [it.seed for it in batch], **sample_kwargs).images
        for image, item, detections in zip(images, batch, judge.detect_batch(images.float().cpu())):
            scores = score_image(parse_prompt(item.prompt), detections)
            for name, value in scores.items():
                sums[index[f"{item.category}/{name}"]] += value
                counts[index[f"{item.category}/{name}"]] += 1
            if len(kept) < keep_images:
                kept.append((image.cpu(), item, scores))
    return sums, counts, kept


def summarise(keys: list[str], sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Per-category means plus the mean over categories of each metric (``<metric>`` without prefix)."""
    out = {k: float(s / c) for k, s, c in zip(keys, sums, counts) if c > 0}
    for metric in METRICS:
        values = [v for k, v in out.items() if k.endswith(f"/{metric}")]
        if values:
            out[metric] = sum(values) / len(values)
    return out


def image_grid(images: Sequence[torch.Tensor], columns: int = 8):
    """A PIL grid of B x 3 x H x W images in [0, 1]."""
    from PIL import Image

    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    h, w = images[0].shape[-2:]
    grid = Image.new("RGB", (columns * (w + 2), rows * (h + 2)), (255, 255, 255))
    for i, img in enumerate(images):
        arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        grid.paste(Image.fromarray(arr), ((i % columns) * (w + 2), (i // columns) * (h + 2)))
    return grid
