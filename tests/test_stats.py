"""Paired bootstrap intervals: exact on shifts, paired (prompt difficulty cancels), right coverage."""

import numpy as np
import pytest

from t2i_align.stats import paired_bootstrap, per_prompt_means


def scores(values, categories=("a", "b")):
    n = len(values) // len(categories)
    return {f"{c}/{i}": (c, float(values[j * n + i])) for j, c in enumerate(categories) for i in range(n)}


def test_a_constant_shift_is_exact_and_per_category():
    rng = np.random.default_rng(0)
    base = rng.random(40)
    shifted = base + np.r_[np.full(20, 0.1), np.full(20, 0.3)]  # category a: +0.1, b: +0.3
    d = paired_bootstrap(scores(base), scores(shifted))
    assert d.difference == pytest.approx(0.2) and d.low == pytest.approx(0.2) and d.high == pytest.approx(0.2)
    assert paired_bootstrap(scores(base), scores(shifted), category="b").difference == pytest.approx(0.3)
    assert str(d) == "+0.200 [+0.200, +0.200]"


def test_prompt_difficulty_cancels_in_the_pairing():
    """Prompts differ a lot in difficulty (shared by both models); the method adds 0.05 with small noise:
    the paired interval excludes 0 although the spread of the scores is ten times the effect."""
    rng = np.random.default_rng(1)
    difficulty = rng.random(200)
    method = difficulty + 0.05 + rng.normal(0, 0.02, 200)
    d = paired_bootstrap(scores(difficulty), scores(method))
    assert 0.03 < d.low < d.difference < d.high < 0.07


def test_interval_covers_a_zero_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    covered = 0
    trials = 300  # deterministic (seeded); a wrong interval (unpaired, wrong scale) lands far outside
    for trial in range(trials):
        base = rng.binomial(1, 0.3, 60).astype(float)  # all_clauses-like 0/1 scores, no true difference
        method = rng.binomial(1, 0.3, 60).astype(float)
        d = paired_bootstrap(scores(base, "abc"), scores(method, "abc"), resamples=300, seed=trial)
        covered += d.low <= 0 <= d.high
    assert 0.90 <= covered / trials <= 0.98


def test_per_prompt_means_average_the_seeds_and_mismatched_sets_are_refused():
    records = [{"key": "a/p1/0", "category": "a", "scores": {"all_clauses": 1.0}},
               {"key": "a/p1/1", "category": "a", "scores": {"all_clauses": 0.0}},
               {"key": "b/p2/0", "category": "b", "scores": {"all_clauses": 1.0}}]
    means = per_prompt_means(records, "all_clauses")
    assert means == {"a/p1": ("a", 0.5), "b/p2": ("b", 1.0)}
    with pytest.raises(ValueError, match="different prompts"):
        paired_bootstrap(means, {"a/p1": ("a", 0.5)})
