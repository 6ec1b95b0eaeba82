"""Every ToyWorld quality bar, measured and printed:
``python -m t2i_align.commands.toyworld_quality [--models models/toyworld] [--parts judge clip captioner pipeline]``.

* judge: object-level accuracy on held-out renders, clean (>= 99 %) and degraded with blur + noise (>= 95 %);
* captioner: CoMat B.3 sensitivity (true caption more likely than each corruption, >= 95 %) and greedy
  captions that parse to the right scene (>= 90 %), on held-out scenes of the training mix and of the
  (never trained on) evaluation prompts;
* CLIP: retrieval and corruption accuracy (reported; no bar in the issue);
* base pipeline: canonical single-object prompts judged right in shape and colour (>= 90 %), and the
  alignment gap: ``all_clauses`` per evaluation category, plus colour binding on counter-canonical pairs
  (expected well under 60 %). ``--grid`` saves a sample grid.

Exits 1 if a bar is missed. ``--out`` writes all numbers as JSON.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from t2i_align.common import image_grid
from t2i_align.toyworld.evaluation.scoring import load_items, metric_keys, score_items, summarise
from t2i_align.toyworld.experts.judge import ToyJudge, held_out_scenes, score_renders
from t2i_align.toyworld.evaluation.metrics import score_image
from t2i_align.toyworld.splits import (
    EVAL_CATEGORIES,
    canonical_single_prompts,
    eval_prompt_sets,
    write_prompts,
)
from t2i_align.toyworld.world import CANONICAL, Phrase, PromptSpec, parse_prompt

PARTS = ("judge", "clip", "captioner", "pipeline")
BARS = {
    "judge/clean": 0.99,
    "judge/degraded": 0.95,
    "captioner/mix/sensitivity": 0.95,
    "captioner/mix/caption_exact": 0.90,
    "pipeline/canonical_single/shape_colour": 0.90,
}
CEILINGS = {"pipeline/color_binding_counter/all_clauses": 0.60}  # the gap: must stay under


def judge_quality(images: int = 1000, seed: int = 9_000_000) -> dict[str, float]:
    judge, scenes = ToyJudge(), held_out_scenes(images, seed)
    return {f"judge/{c}": score_renders(judge, scenes, degraded=c == "degraded").accuracy for c in ("clean", "degraded")}


def counter_canonical(spec: PromptSpec) -> bool:
    return all(p.colour is not None and p.colour != CANONICAL[p.shape] for p in spec.phrases)


@torch.no_grad()
def pipeline_quality(pipeline: str, per_category: int = 50, images_per_prompt: int = 4, steps: int = 25,
                     guidance: float = 5.0, batch_size: int = 64, device: str = "cpu", seed: int = 0,
                     grid: Path | None = None) -> dict[str, float]:
    """Canonical singles (shape + colour, and every stated word) and ``all_clauses`` per category."""
    from t2i_align.diffusion.generator import Generator, GeneratorConfig
    from t2i_align.diffusion.sampling import SamplingSettings

    generator = Generator(GeneratorConfig(pretrained=pipeline, lora=None)).to(device).eval()
    sampling = SamplingSettings(steps, guidance_scale=guidance, scheduler="ddim")
    judge = ToyJudge()
    out: dict[str, float] = {}
    shown = []
    with tempfile.TemporaryDirectory() as tmp:
        write_prompts(canonical_single_prompts(), Path(tmp) / "canonical_single.txt")
        items = load_items(tmp, ["canonical_single"], None, images_per_prompt, seed)
        right = [0.0, 0.0]
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            images = generator.sample([it.prompt for it in batch], [it.seed for it in batch], sampling).images.cpu()
            for image, item, found in zip(images, batch, judge.detect_batch(images)):
                phrase = parse_prompt(item.prompt).phrases[0]
                bare = PromptSpec((Phrase(phrase.shape, colour=phrase.colour),))
                right[0] += score_image(bare, found)["all_clauses"]
                right[1] += score_image(parse_prompt(item.prompt), found)["all_clauses"]
                if len(shown) < 16 and item.seed % 2 == 0:
                    shown.append(image)
        out["pipeline/canonical_single/shape_colour"] = right[0] / len(items)
        out["pipeline/canonical_single/all_words"] = right[1] / len(items)

        sets = eval_prompt_sets(0, 100)
        for category, specs in sets.items():
            write_prompts(specs[:per_category], Path(tmp) / f"{category}.txt")
        counter = [s for s in sets["color_binding"] if counter_canonical(s)]
        write_prompts(counter[:per_category], Path(tmp) / "color_binding_counter.txt")
        categories = [*EVAL_CATEGORIES, "color_binding_counter"]
        keys = metric_keys(categories)
        items = load_items(tmp, categories, None, 1, seed)
        sums, counts, kept = score_items(generator, items, judge, keys, batch_size, keep_images=48, sampling=sampling)
    for key, value in summarise(keys, sums, counts).items():
        if key.endswith("/all_clauses") or key.endswith("/object_accuracy"):
            out[f"pipeline/{key}"] = value
    if grid is not None:
        image_grid(shown + [img for img, _, _ in kept], columns=16).save(grid)
    return out
