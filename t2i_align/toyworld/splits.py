"""ToyWorld splits, all deterministic from one seed, and their export.

* natural pairs: rendered scenes with captions from the NATURAL distribution, written in TokenCompose's
  ``metadata.jsonl`` layout (one mask per noun) — pretraining data of the base model and the "real
  image-caption pairs" of the methods;
* compositional training prompts (COMPOSITIONAL distribution) for the reward / image-to-text methods;
* evaluation prompt sets per category, disjoint (by text) from every training prompt and caption, each
  also written as a T2I-CompBench-style txt file (one prompt per line).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from t2i_align.toyworld.world import (
    CANONICAL,
    COLOURS,
    COMPOSITIONAL,
    NATURAL,
    RELATIONS,
    SHAPES,
    Distribution,
    Phrase,
    PromptSpec,
    Scene,
    place,
    render,
    sample_spec,
)

EVAL_CATEGORIES = ("color_binding", "shape", "texture", "size", "spatial", "counting", "multi_object")


def _two_shapes(rng: random.Random) -> list[str]:
    return rng.sample(SHAPES, 2)


def _colour_binding(rng: random.Random) -> PromptSpec:
    """Two shapes, two different colours, at least one of them counter-canonical."""
    while True:
        s1, s2 = _two_shapes(rng)
        c1, c2 = rng.sample(list(COLOURS), 2)
        if c1 != CANONICAL[s1] or c2 != CANONICAL[s2]:
            return PromptSpec((Phrase(s1, colour=c1), Phrase(s2, colour=c2)), None, "pair")


def _shape(rng: random.Random) -> PromptSpec:
    """Two different shapes in the same colour (colour cannot tell them apart), sizes optionally named."""
    s1, s2 = _two_shapes(rng)
    c = rng.choice(list(COLOURS))
    z1, z2 = rng.choice((None, "small", "big")), rng.choice((None, "small", "big"))
    return PromptSpec((Phrase(s1, colour=c, size=z1), Phrase(s2, colour=c, size=z2)), None, "pair")


def _texture(rng: random.Random) -> PromptSpec:
    s1, s2 = _two_shapes(rng)
    c1, c2 = rng.choice(list(COLOURS)), rng.choice(list(COLOURS))
    return PromptSpec((Phrase(s1, colour=c1, texture="striped"), Phrase(s2, colour=c2, texture="plain")), None, "pair")


def _size(rng: random.Random) -> PromptSpec:
    s1, s2 = _two_shapes(rng)
    c1, c2 = rng.choice(list(COLOURS)), rng.choice(list(COLOURS))
    return PromptSpec((Phrase(s1, colour=c1, size="big"), Phrase(s2, colour=c2, size="small")), None, "pair")


def _spatial(rng: random.Random) -> PromptSpec:
    s1, s2 = _two_shapes(rng)
    c1, c2 = rng.choice(list(COLOURS)), rng.choice(list(COLOURS))
    return PromptSpec((Phrase(s1, colour=c1), Phrase(s2, colour=c2)), rng.choice(RELATIONS), "spatial")


def _counting(rng: random.Random) -> PromptSpec:
    return sample_spec(COMPOSITIONAL, rng, "counting")


def _multi(rng: random.Random) -> PromptSpec:
    phrases = tuple(Phrase(s, colour=rng.choice(list(COLOURS))) for s in rng.sample(SHAPES, 4))
    return PromptSpec(phrases, None, "multi")


CATEGORY_SAMPLERS: dict[str, Callable[[random.Random], PromptSpec]] = {
    "color_binding": _colour_binding,
    "shape": _shape,
    "texture": _texture,
    "size": _size,
    "spatial": _spatial,
    "counting": _counting,
    "multi_object": _multi,
}


def canonical_single_prompts() -> list[PromptSpec]:
    """Every shape in its canonical colour, plain and with size/texture words (the base-model sanity set)."""
    specs = []
    for shape in SHAPES:
        for size in (None, "small", "big"):
            for texture in (None, "plain", "striped"):
                specs.append(PromptSpec((Phrase(shape, colour=CANONICAL[shape], size=size, texture=texture),), None, "single"))
    return specs


def _unique(sampler: Callable[[random.Random], PromptSpec], rng: random.Random, n: int, exclude: set[str]) -> list[PromptSpec]:
    out, seen = [], set(exclude)
    for _ in range(n * 200):
        spec = sampler(rng)
        if spec.text() not in seen:
            seen.add(spec.text())
            out.append(spec)
            if len(out) == n:
                return out
    raise RuntimeError(f"only {len(out)} distinct prompts found, {n} asked for")


def eval_prompt_sets(seed: int, per_category: int) -> dict[str, list[PromptSpec]]:
    """Disjoint evaluation prompts per category (no text appears in two categories)."""
    rng = random.Random(f"toyworld-eval-{seed}")
    sets: dict[str, list[PromptSpec]] = {}
    used: set[str] = set()
    for category in EVAL_CATEGORIES:
        sets[category] = _unique(CATEGORY_SAMPLERS[category], rng, per_category, used)
        used |= {s.text() for s in sets[category]}
    return sets


def validation_prompt_sets(seed: int, per_category: int, exclude: set[str]) -> dict[str, list[PromptSpec]]:
    """Held-out prompts per category, drawn like the evaluation prompts from their own stream and disjoint from
    ``exclude`` (evaluation and training prompts) and from each other: for choosing stopping steps and settings,
    never the evaluation prompts."""
    rng = random.Random(f"toyworld-val-{seed}")
    sets: dict[str, list[PromptSpec]] = {}
    used = set(exclude)
    for category in EVAL_CATEGORIES:
        sets[category] = _unique(CATEGORY_SAMPLERS[category], rng, per_category, used)
        used |= {s.text() for s in sets[category]}
    return sets


def training_prompts(seed: int, n: int, exclude: set[str]) -> list[PromptSpec]:
    """Compositional training prompts, none of whose texts is in ``exclude`` (the evaluation prompts)."""
    rng = random.Random(f"toyworld-train-{seed}")
    return _unique(lambda r: sample_spec(COMPOSITIONAL, r), rng, n, exclude)


def natural_scenes(seed: int, n: int, exclude: set[str], dist: Distribution = NATURAL) -> list[Scene]:
    """Scenes with captions of ``dist`` (NATURAL by default; repeats allowed, as in real data), avoiding the
    evaluation prompts."""
    rng = random.Random(f"toyworld-{dist.name}-{seed}")
    scenes = []
    while len(scenes) < n:
        spec = sample_spec(dist, rng)
        if spec.text() not in exclude:
            scenes.append(place(spec, dist, rng))
    return scenes


def _noun(phrase: Phrase) -> str:
    return phrase.shape if phrase.count == 1 else phrase.shape + "s"


def write_pairs(scenes: list[Scene], root: str | Path, size: int = 64) -> Path:
    """Render scenes into ``root`` in TokenCompose's layout; returns ``root/metadata.jsonl``.

    Each record: ``file_name``, ``text`` (caption), ``attn_list`` ([noun as written, mask path] per phrase;
    the mask is the union of the phrase's objects) and ``objects`` (the scene graph).
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    lines = []
    for i, scene in enumerate(scenes):
        image, masks = render(scene, size)
        file_name = f"images/{i:06d}.png"
        image.save(root / file_name)
        attn_list, k = [], 0
        for j, phrase in enumerate(scene.spec.phrases):
            union = np.zeros((size, size), dtype=bool)
            for mask in masks[k:k + phrase.count]:
                union |= mask
            k += phrase.count
            mask_name = f"masks/{i:06d}_{j}.png"
            Image.fromarray(union.astype(np.uint8) * 255).save(root / mask_name)
            attn_list.append([_noun(phrase), mask_name])
        objects = [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "texture": o.texture, "x": o.x, "y": o.y}
            for o in scene.objects
        ]
        lines.append(json.dumps({"file_name": file_name, "text": scene.caption, "attn_list": attn_list, "objects": objects}))
    meta = root / "metadata.jsonl"
    meta.write_text("\n".join(lines) + "\n")
    return meta


def write_prompts(specs: list[PromptSpec], path: str | Path) -> Path:
    """One prompt per line (the T2I-CompBench txt layout)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(s.text() + "\n" for s in specs))
    return path


# TIFA element types of the scene-graph questions (metrics.Question.element -> TIFA's element_type)
TIFA_TYPES = {"object": "object", "color": "color", "size": "size", "texture": "texture", "count": "counting",
              "spatial": "spatial"}
COUNT_CHOICES = tuple(str(n) for n in range(9))


def tifa_questions(sets: dict[str, list[PromptSpec]]) -> list[dict]:
    """The evaluation prompts' scene-graph questions in TIFA's question-answer JSON format (ids
    ``<category>_<index>``), answerable by the judge (:class:`t2i_align.toyworld.experts.vqa.ToyVQA`)."""
    from t2i_align.toyworld.evaluation.metrics import questions

    out = []
    for category, specs in sets.items():
        for i, spec in enumerate(specs):
            for q in questions(spec):
                choices = list(COUNT_CHOICES) if q.element == "count" else ["yes", "no"]
                element = " ".join(w for w in (q.phrase.colour, q.phrase.shape) if w)
                out.append({"id": f"{category}_{i}", "caption": spec.text(), "question": q.text, "choices": choices,
                            "answer": q.answer, "element_type": TIFA_TYPES[q.element], "element": element})
    return out
