"""ToyWorld world, splits and toy metrics (with ground-truth objects standing in for the judge)."""

import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from t2i_align.datamodules import PairDataset
from t2i_align.toyworld.evaluation.metrics import aggregate, answer, clause_verdicts, questions, score_image
from t2i_align.toyworld.splits import (
    EVAL_CATEGORIES,
    canonical_single_prompts,
    eval_prompt_sets,
    natural_scenes,
    training_prompts,
    validation_prompt_sets,
    write_pairs,
    write_prompts,
)
from t2i_align.toyworld.world import (
    CANONICAL,
    COMPOSITIONAL,
    NATURAL,
    Obj,
    Phrase,
    PromptSpec,
    parse_prompt,
    place,
    relation_holds,
    render,
    sample_scene,
    sample_spec,
)


def scenes(dist, n, seed=0):
    rng = random.Random(seed)
    return [sample_scene(dist, rng) for _ in range(n)]


def test_prompt_text_parses_back_to_its_spec():
    rng = random.Random(1)
    for dist in (NATURAL, COMPOSITIONAL):
        for _ in range(300):
            spec = sample_spec(dist, rng)
            assert parse_prompt(spec.text()) == spec, spec.text()
    assert parse_prompt("A Photo of a red circle, a blue square,  and a green star.").num_objects == 3
    with pytest.raises(ValueError, match="cannot parse"):
        parse_prompt("a red elephant")


def test_natural_distribution_is_biased_and_small():
    rng = random.Random(2)
    specs = [sample_spec(NATURAL, rng) for _ in range(3000)]
    phrases = [p for s in specs for p in s.phrases]
    canonical = sum(p.colour == CANONICAL[p.shape] for p in phrases) / len(phrases)
    small_scenes = sum(s.num_objects <= 2 for s in specs) / len(specs)
    assert 0.82 < canonical < 0.88 and 0.87 < small_scenes < 0.93
    comp = [sample_spec(COMPOSITIONAL, rng) for _ in range(3000)]
    comp_phrases = [p for s in comp for p in s.phrases]
    assert sum(p.colour == CANONICAL[p.shape] for p in comp_phrases) / len(comp_phrases) < 0.25
    assert all(2 <= s.num_objects <= 4 for s in comp)
    words = Counter(w for s in specs for w in s.text().split())
    assert words["striped"] > 0 and words["big"] > 0 and words["small"] > 0


def test_scenes_satisfy_their_captions_without_overlap():
    for scene in scenes(COMPOSITIONAL, 200) + scenes(NATURAL, 100, seed=5):
        image, masks = render(scene)
        assert image.size == (64, 64) and len(masks) == len(scene.objects)
        total = np.sum([m.astype(int) for m in masks], axis=0)
        assert total.max() <= 1  # no pixel belongs to two objects
        assert all(m.sum() > 40 for m in masks)
        assert score_image(scene.spec, scene.objects) == {**score_image(scene.spec, scene.objects), "all_clauses": 1.0, "tifa": 1.0}


def test_metrics_catch_binding_count_and_relation_errors():
    spec = PromptSpec((Phrase("circle", colour="blue"), Phrase("square", colour="red")), "to the left of", "spatial")
    scene = place(spec, COMPOSITIONAL, random.Random(0))
    good = score_image(spec, scene.objects)
    assert good["all_clauses"] == 1 and good["object_accuracy"] == 1 and good["tifa"] == 1
    swapped = [replace(o, colour="red" if o.colour == "blue" else "blue") for o in scene.objects]
    bad = score_image(spec, swapped)
    assert bad["all_clauses"] == 0 and bad["object_accuracy"] == 0 and 0 < bad["tifa"] < 1
    mirrored = [replace(o, x=64 - o.x) for o in scene.objects]
    assert score_image(spec, mirrored)["all_clauses"] == 0
    assert score_image(spec, mirrored)["object_accuracy"] == 1
    counting = parse_prompt("three green stars and a blue circle")
    objs = [Obj("star", "green", "big", "plain", 10 + 15 * i, 10) for i in range(2)] + [Obj("circle", "blue", "big", "plain", 40, 40)]
    s = score_image(counting, objs)
    assert s["all_clauses"] == 0 and s["object_accuracy"] == 0.75 and s["mg3"] == 1 and s["mg4"] == 0
    q = [q for q in questions(counting) if q.element == "count"][0]
    assert q.answer == "3" and answer(q, objs) == "2"


def test_missing_objects_are_told_apart_from_wrongly_drawn_ones():
    spec = PromptSpec((Phrase("circle", colour="blue"), Phrase("square", colour="red")), "to the left of", "spatial")
    blue_circle, red_square = Obj("circle", "blue", "big", "plain", 10, 30), Obj("square", "red", "big", "plain", 40, 30)
    verdicts = lambda objs: [c["verdict"] for c in clause_verdicts(spec, objs)]  # noqa: E731
    assert verdicts([blue_circle, red_square]) == ["ok", "ok", "ok"]
    assert verdicts([red_square, replace(blue_circle, x=50)]) == ["ok", "ok", "wrong_relation"]
    only_circle = score_image(spec, [blue_circle])
    assert verdicts([blue_circle]) == ["ok", "missing", "objects_missing"]
    assert (only_circle["object_accuracy"], only_circle["object_missing"], only_circle["attribute_wrong"]) == (0.5, 0.5, 0)
    green_square = replace(red_square, colour="green")
    wrong = score_image(spec, [blue_circle, green_square])
    assert verdicts([blue_circle, green_square]) == ["ok", "wrong_attribute", "objects_missing"]
    assert (wrong["object_accuracy"], wrong["object_missing"], wrong["attribute_wrong"]) == (0.5, 0, 0.5)
    # an object that fits another phrase is that phrase's: a second blue circle for "a red circle" is missing
    two = PromptSpec((Phrase("circle", colour="blue"), Phrase("circle", colour="red")))
    assert [c["verdict"] for c in clause_verdicts(two, [blue_circle])] == ["ok", "missing"]
    assert [c["verdict"] for c in clause_verdicts(two, [blue_circle, blue_circle])] == ["too_many", "missing"]
    counting = parse_prompt("three green stars")
    stars = [Obj("star", "green", "big", "plain", 10 + 15 * i, 10) for i in range(2)]
    assert clause_verdicts(counting, stars)[0] | {} == {"clause": "three green stars", "verdict": "too_few", "right": 2,
                                                       "wrong_attribute": 0, "missing": 1}


def test_relation_rule():
    a, b = Obj("circle", "red", "big", "plain", 10, 30), Obj("star", "red", "big", "plain", 40, 35)
    assert relation_holds("to the left of", a, b) and relation_holds("to the right of", b, a)
    assert not relation_holds("above", a, b) and not relation_holds("below", a, b)


def test_splits_are_deterministic_and_disjoint():
    sets = eval_prompt_sets(seed=0, per_category=40)
    assert list(sets) == list(EVAL_CATEGORIES) and all(len(v) == 40 for v in sets.values())
    assert eval_prompt_sets(seed=0, per_category=40) == sets
    assert eval_prompt_sets(seed=1, per_category=40) != sets
    texts = [s.text() for v in sets.values() for s in v]
    assert len(set(texts)) == len(texts)
    train = training_prompts(0, 300, set(texts))
    assert not {s.text() for s in train} & set(texts)
    natural = natural_scenes(0, 200, set(texts))
    assert not {s.caption for s in natural} & set(texts)
    # the validation split: per category, disjoint from evaluation, training and the other categories
    val = validation_prompt_sets(0, 30, set(texts) | {s.text() for s in train})
    val_texts = [s.text() for v in val.values() for s in v]
    assert list(val) == list(EVAL_CATEGORIES) and len(val_texts) == len(set(val_texts)) == 30 * len(EVAL_CATEGORIES)
    assert not set(val_texts) & (set(texts) | {s.text() for s in train})
    assert all(any(p.colour != CANONICAL[p.shape] for p in s.phrases) for s in val["color_binding"])
    assert validation_prompt_sets(0, 30, set(texts)) != eval_prompt_sets(0, 30)  # its own stream
    assert all(any(p.colour != CANONICAL[p.shape] for p in s.phrases) for s in sets["color_binding"])
    assert all(s.relation for s in sets["spatial"]) and all(s.num_objects == 4 for s in sets["multi_object"])
    assert all(p.count == 1 and p.colour == CANONICAL[p.shape] for s in canonical_single_prompts() for p in s.phrases)


def test_exported_pairs_read_back_through_the_pair_reader(tmp_path):
    natural = natural_scenes(0, 12, set())
    meta = write_pairs(natural, tmp_path / "pairs")
    data = PairDataset(str(meta), resolution=64)
    assert len(data) == 12
    for i, scene in enumerate(natural):
        item = data[i]
        assert item["caption"] == scene.caption
        nouns = [noun for noun, _ in item["masks"]]
        assert nouns == [p.shape + ("s" if p.count > 1 else "") for p in scene.spec.phrases]
        _, masks = render(scene)
        assert item["masks"][0][1].sum() > 0.8 * masks[0].sum()
    path = write_prompts([s.spec for s in natural], tmp_path / "p.txt")
    assert [parse_prompt(line) for line in path.read_text().splitlines()] == [s.spec for s in natural]


def test_aggregate_means_per_category():
    agg = aggregate([("a", {"x": 1.0}), ("a", {"x": 0.0}), ("b", {"x": 1.0, "mg2": 1.0})])
    assert agg == {"a/n": 2.0, "a/x": 0.5, "b/mg2": 1.0, "b/n": 1.0, "b/x": 1.0}


def test_coco_like_pairs_hold_several_objects_each_with_its_mask(tmp_path):
    from t2i_align.commands.toyworld_build import build

    sizes = dict(natural=40, natural_val=4, train_prompts=20, eval_per_category=3, val_per_category=2)
    out = build(tmp_path / "tw", **sizes, coco_like=60)
    coco = PairDataset(str(out / "coco_like" / "metadata.jsonl"), resolution=64)
    assert len(coco) == 60
    for i in range(len(coco)):
        item = coco[i]
        spec = parse_prompt(item["caption"])
        assert 2 <= spec.num_objects <= 4, item["caption"]
        assert [noun for noun, _ in item["masks"]] == [p.shape + ("s" if p.count > 1 else "") for p in spec.phrases]
        assert all(mask.sum() > 0 for _, mask in item["masks"])
    # adding the split changed none of the others
    without = build(tmp_path / "tw0", **sizes, coco_like=0)
    for split in ("natural/metadata.jsonl", "natural_val/metadata.jsonl", "prompts/compositional_train.txt"):
        assert (out / split).read_text() == (without / split).read_text(), split
