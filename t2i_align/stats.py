"""Paired comparisons of two models on the same evaluation items, with bootstrap confidence intervals.

Both models are scored on the same prompts with the same seeds, so the comparison is paired: the
difference is taken per prompt (the mean over its seeds), and the prompts are resampled with replacement
within each category (stratified, so every category keeps its size). The summary is the mean over
categories of the per-category means, as the ToyWorld tables report it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """``method - base`` with its percentile bootstrap interval at ``level``."""

    base: float
    method: float
    difference: float
    low: float
    high: float
    level: float
    prompts: int

    def __str__(self) -> str:
        return f"{self.difference:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def per_prompt_means(records: Iterable[Mapping], metric: str) -> dict[str, tuple[str, float]]:
    """``prompt key -> (category, mean of metric over its images)`` from per-image records whose ``key`` is
    ``<category>/<prompt id>/<image number>`` (``ToyWorldEvaluation(per_image=True)``)."""
    values: dict[str, list[float]] = defaultdict(list)
    category: dict[str, str] = {}
    for r in records:
        prompt = r["key"].rsplit("/", 1)[0]
        values[prompt].append(float(r["scores"][metric]))
        category[prompt] = r["category"]
    return {k: (category[k], float(np.mean(v))) for k, v in values.items()}


def paired_bootstrap(base: Mapping[str, tuple[str, float]], method: Mapping[str, tuple[str, float]],
                     resamples: int = 2000, level: float = 0.95, seed: int = 0,
                     category: str | None = None) -> PairedDifference:
    """Mean-over-categories difference ``method - base`` (or one ``category``'s) with a stratified paired
    bootstrap interval. Both must score the same prompts (``prompt -> (category, value)``)."""
    if set(base) != set(method):
        missing = sorted(set(base) ^ set(method))
        raise ValueError(f"the two evaluations scored different prompts ({len(missing)} differ, e.g. {missing[:3]})")
    groups: dict[str, list[str]] = defaultdict(list)
    for key, (cat, _) in sorted(base.items()):
        if category is None or cat == category:
            groups[cat].append(key)
    if not groups:
        raise ValueError(f"no prompts of category {category!r}")
    rng = np.random.default_rng(seed)
    a_means, b_means, boot = [], [], np.zeros(resamples)
    for keys in groups.values():
        a = np.array([base[k][1] for k in keys])
        b = np.array([method[k][1] for k in keys])
        a_means.append(a.mean())
        b_means.append(b.mean())
        picks = rng.integers(0, len(keys), size=(resamples, len(keys)))
        boot += (b - a)[picks].mean(axis=1)
    boot /= len(groups)
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    base_mean, method_mean = float(np.mean(a_means)), float(np.mean(b_means))
    return PairedDifference(base_mean, method_mean, method_mean - base_mean, float(low), float(high), level,
                            sum(len(k) for k in groups.values()))
