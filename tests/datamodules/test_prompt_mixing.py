"""PromptSource loading, weighted mixing, PromptDataset / collate."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from t2i_align.datamodules import (
    PromptDataset,
    PromptSource,
    StreamSampler,
    collate_prompts,
    load_prompt_sources,
)


def make_set(tmp_path: Path, name: str, n: int) -> str:
    path = tmp_path / f"{name}.txt"
    path.write_text("\n".join(f"{name} prompt {i}" for i in range(n)), encoding="utf-8")
    return str(path)


def source_shares(
    tmp_path: Path, sizes: dict[str, int], weights: dict[str, float], draws: int
) -> dict[str, float]:
    sources = [PromptSource(make_set(tmp_path, k, n), weight=weights[k]) for k, n in sizes.items()]
    prompts, item_weights = load_prompt_sources(sources)
    sampler = StreamSampler(len(prompts), batch_size=1, seed=123, weights=item_weights)
    it = iter(sampler)
    counts = Counter(prompts[next(it)].source for _ in range(draws))
    return {k: counts[k] / draws for k in sizes}


def test_equal_weights_draw_sets_equally_often_regardless_of_size(tmp_path: Path) -> None:
    shares = source_shares(tmp_path, {"small": 10, "big": 1000}, {"small": 1.0, "big": 1.0}, 20_000)
    assert shares["small"] == pytest.approx(0.5, abs=0.02)  # size-proportional would give ~0.01


def test_unequal_weights(tmp_path: Path) -> None:
    shares = source_shares(tmp_path, {"a": 10, "b": 1000}, {"a": 3.0, "b": 1.0}, 20_000)
    assert shares["a"] == pytest.approx(0.75, abs=0.02)


def test_item_weights_sum_per_source(tmp_path: Path) -> None:
    prompts, weights = load_prompt_sources(
        [
            PromptSource(make_set(tmp_path, "a", 10), weight=2),
            PromptSource(make_set(tmp_path, "b", 30), limit=5),
        ]
    )
    assert len(prompts) == 15 and [p.source for p in prompts] == ["a"] * 10 + ["b"] * 5
    assert [p.text for p in prompts[10:]] == [
        f"b prompt {i}" for i in range(5)
    ]  # limit keeps the first items
    assert sum(weights[:10]) == pytest.approx(2 / 3) and sum(weights[10:]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf")])
def test_invalid_weights(tmp_path: Path, weight: float) -> None:
    with pytest.raises(ValueError, match="weight must be a finite number > 0"):
        load_prompt_sources([PromptSource(make_set(tmp_path, "a", 3), weight=weight)])


def test_duplicate_source_names_and_bad_limit(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    a = make_set(tmp_path, "a", 3)
    other = tmp_path / "x" / "a.txt"
    other.write_text("z", encoding="utf-8")
    with pytest.raises(ValueError, match="share the set name 'a'"):
        load_prompt_sources([PromptSource(a), PromptSource(str(other))])
    prompts, _ = load_prompt_sources([PromptSource(a), PromptSource(str(other), name="a2")])
    assert {p.source for p in prompts} == {"a", "a2"}
    with pytest.raises(ValueError, match="limit must be a whole number >= 1"):
        load_prompt_sources([PromptSource(a, limit=0)])
    with pytest.raises(ValueError, match="no prompt sources"):
        load_prompt_sources([])


def test_dataset_and_collate(tmp_path: Path) -> None:
    prompts, _ = load_prompt_sources([PromptSource(make_set(tmp_path, "a", 5), name="set")])
    ds = PromptDataset(prompts)
    assert len(ds) == 5 and ds[2] == prompts[2]
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_prompts)))
    assert batch == {
        "prompts": ["a prompt 0", "a prompt 1", "a prompt 2"],
        "ids": ["0", "1", "2"],
        "sources": ["set"] * 3,
    }
