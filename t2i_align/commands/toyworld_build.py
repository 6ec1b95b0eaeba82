"""Write the ToyWorld data splits: ``python -m t2i_align.commands.toyworld_build OUT [--seed 0] ...``.

Layout (everything deterministic from the seed)::

    OUT/natural/metadata.jsonl (+ images/, masks/)    natural pairs: pretraining and L_pre data
    OUT/natural_val/metadata.jsonl                    held-out natural pairs (validation, FID reference)
    OUT/coco_like/metadata.jsonl (+ images/, masks/)  pairs with natural colours and 2-4 objects each, exact
                                                      per-noun masks (TokenCompose's COCO premise)
    OUT/prompts/compositional_train.txt               compositional training prompts
    OUT/prompts/eval/<category>.txt                   evaluation prompts (T2I-CompBench-style txt)
    OUT/prompts/val/<category>.txt                    held-out validation prompts per category (stopping steps,
                                                      settings), disjoint from evaluation and training prompts
    OUT/prompts/eval_tifa.json                        their scene-graph questions (TIFA question-answer format)
    OUT/prompts/canonical_single.txt                  single objects in canonical colours (base-model check)
    OUT/manifest.json                                 seed, sizes and distribution parameters
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from t2i_align.io import atomic_path
from t2i_align.toyworld.splits import (
    canonical_single_prompts,
    eval_prompt_sets,
    natural_scenes,
    tifa_questions,
    training_prompts,
    validation_prompt_sets,
    write_pairs,
    write_prompts,
)
from t2i_align.toyworld.world import COCO_LIKE, COMPOSITIONAL, NATURAL


def build(out: str | Path, seed: int = 0, natural: int = 20000, natural_val: int = 512, train_prompts: int = 5000,
          eval_per_category: int = 100, size: int = 64, val_per_category: int = 50, coco_like: int = 4000) -> Path:
    """Write all splits into ``out`` (replaced atomically) and return it."""
    out = Path(out)
    with atomic_path(out, is_dir=True) as tmp:
        evals = eval_prompt_sets(seed, eval_per_category)
        eval_texts = {s.text() for specs in evals.values() for s in specs}
        for category, specs in evals.items():
            write_prompts(specs, tmp / "prompts" / "eval" / f"{category}.txt")
        (tmp / "prompts" / "eval_tifa.json").write_text(json.dumps(tifa_questions(evals), indent=1) + "\n")
        train = training_prompts(seed, train_prompts, eval_texts)
        write_prompts(train, tmp / "prompts" / "compositional_train.txt")
        # drawn after (and apart from) the other splits, so adding it changed none of them
        held_out = eval_texts | {s.text() for s in train}
        for category, specs in validation_prompt_sets(seed, val_per_category, held_out).items():
            write_prompts(specs, tmp / "prompts" / "val" / f"{category}.txt")
        write_prompts(canonical_single_prompts(), tmp / "prompts" / "canonical_single.txt")
        scenes = natural_scenes(seed, natural + natural_val, eval_texts)
        write_pairs(scenes[:natural], tmp / "natural", size)
        write_pairs(scenes[natural:], tmp / "natural_val", size)
        # drawn from their own stream after the others, so adding them changed none of the other splits
        write_pairs(natural_scenes(seed, coco_like, eval_texts, COCO_LIKE), tmp / "coco_like", size)
        manifest = {
            "seed": seed,
            "image_size": size,
            "natural": natural,
            "natural_val": natural_val,
            "coco_like": coco_like,
            "train_prompts": train_prompts,
            "eval_per_category": eval_per_category,
            "val_per_category": val_per_category,
            "distributions": [dataclasses.asdict(d) for d in (NATURAL, COMPOSITIONAL, COCO_LIKE)],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--natural", type=int, default=20000, help="natural training pairs")
    parser.add_argument("--natural-val", type=int, default=512, help="held-out natural pairs")
    parser.add_argument("--train-prompts", type=int, default=5000, help="compositional training prompts")
    parser.add_argument("--eval-per-category", type=int, default=100)
    parser.add_argument("--val-per-category", type=int, default=50, help="held-out validation prompts per category")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--coco-like", type=int, default=4000, help="COCO-like pairs (several objects per image)")
    args = parser.parse_args(argv)
    build(args.out, args.seed, args.natural, args.natural_val, args.train_prompts, args.eval_per_category, args.size,
          args.val_per_category, args.coco_like)
    print(f"wrote ToyWorld splits to {args.out}")


if __name__ == "__main__":
    main()
