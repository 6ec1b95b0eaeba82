"""The fine stage's positive control: with oracle inputs, can its attention modulation fix an image at all?

    python -m t2i_align.commands.toyworld_build .cache/toyworld --natural 2000 --natural-val 512
    python -m t2i_align.studies.fine_stage_control --out experiments/results/toyworld_fine_stage_control

On the *validation* prompts (``prompts/val``; the evaluation prompts are not used), first passes of the base model are
judged, and two kinds of images are given a second pass from the same seed at several strengths (a multiplier of
DenseDiffusion's cross/self strengths 1.0/0.3; multiplier 0 = plain resampling, which must change nothing):

* **fixable**: every named object is drawn and at least one has a wrong attribute. The fine stage's ToyWorld experts
  (tagger, likelihood judge, segmenter) are the evaluation judge: masks and local descriptions are the oracle's.
  Reported: the share whose second pass meets every clause, the share with fewer wrong attributes, and the share
  that lost a drawn object.
* **layout**: a named object is missing. Besides the tagged objects, the missing phrase gets an oracle mask, a
  big-object disc in the free space farthest from every drawn object, scored "certain", with its own words as the
  description. Reported: the share in which the missing object appears (anywhere), and inside its mask.

If the shares stay at zero with oracle inputs at high strength, the method cannot act through ToyWorld's 8x8 maps;
if they rise, a null result of the full method comes from its inputs or its strength, not its mechanism.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.studies import report
from t2i_align.studies.fine_stage_compare import FINE
from t2i_align.studies.harness import Model, load_module
from t2i_align.toyworld.evaluation.scoring import judge_records, load_items
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.world import DIAMETER, parse_prompt

SAMPLING = SamplingSettings(num_inference_steps=25, guidance_scale=5.0)  # the evaluation's sampler
DEFAULT_STRENGTHS = {"cross_strength": 1.0, "self_strength": 0.3}  # DenseDiffusion's (gradio_app.py)


def phrase_clauses(record: dict) -> list[dict]:
    return [c for c in record["clauses"] if "missing" in c]


def fixable(record: dict) -> bool:
    clauses = phrase_clauses(record)
    return all(c["missing"] == 0 for c in clauses) and any(c["wrong_attribute"] > 0 for c in clauses)


def missing_phrase(record: dict, prompt: str):
    """The first phrase of ``prompt`` none of whose objects is drawn, or None."""
    for phrase, clause in zip(parse_prompt(prompt).phrases, phrase_clauses(record)):
        if clause["verdict"] == "missing":
            return phrase
    return None


def free_disc(drawn: np.ndarray, size: int, radius: float) -> torch.Tensor:
    """A disc of ``radius`` (64-px units) centred on the point of a 3x3 grid farthest from every ``drawn`` pixel."""
    scale = size / 64
    yy, xx = np.mgrid[0:size, 0:size] / scale
    ys, xs = np.nonzero(drawn)
    centres = [(cx, cy) for cy in (16, 32, 48) for cx in (16, 32, 48)]

    def clearance(c):
        return np.hypot(xs / scale - c[0], ys / scale - c[1]).min() if len(xs) else 0.0

    cx, cy = max(centres, key=clearance)
    return torch.from_numpy(np.hypot(xx - cx, yy - cy) <= radius)


def second_pass(model, prompts, seeds, objects, multiplier: float, texts=None):
    for name, value in DEFAULT_STRENGTHS.items():
        setattr(model, name, value * multiplier)
    edits = model.modulation_edits(objects, SAMPLING) if multiplier else []
    return model.generator.sample(texts or prompts, seeds, SAMPLING, attention_edits=edits).images.float()


def run(per_category: int, seeds: int, multipliers: list[float], batch_size: int = 28) -> dict:
    from t2i_align.lightning_modules.fine_stage import LocalObject

    model, judge = load_module(Model("Base + fine stage", FINE)), ToyJudge()
    items = load_items(".cache/toyworld/prompts/val", per_category=per_category, images_per_prompt=seeds)
    fix_cases, layout_cases = [], []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            prompts, batch_seeds = [it.prompt for it in batch], [it.seed for it in batch]
            images = model.generator.sample(prompts, batch_seeds, SAMPLING).images.float()
            texts, objects = model.local_objects(prompts, images)
            for item, image, text, objs, record in zip(batch, images, texts, objects,
                                                       judge_records(images, batch, judge)):
                if fixable(record):
                    fix_cases.append((item, text, objs, record))
                elif (phrase := missing_phrase(record, item.prompt)) is not None:
                    drawn = np.zeros(image.shape[-2:], dtype=bool)
                    for o in objs:
                        drawn |= o.mask.numpy().astype(bool)
                    mask = free_disc(drawn, image.shape[-1], DIAMETER["big"] / 2)
                    description = phrase.text().split(" ", 1)[1]
                    oracle = LocalObject(description, "certain", description, mask, model._positions(text, description))
                    layout_cases.append((item, text, [*objs, oracle], record, phrase, mask))
        results = {"items": len(items), "fixable": len(fix_cases), "layout": len(layout_cases), "multipliers": {}}
        for m in multipliers:
            fixed = fewer_wrong = lost = appeared = inside = 0
            for cases, kind in ((fix_cases, "fix"), (layout_cases, "layout")):
                for start in range(0, len(cases), batch_size):
                    chunk = cases[start:start + batch_size]
                    chunk_items = [c[0] for c in chunk]
                    after = second_pass(model, [c[0].prompt for c in chunk], [c[0].seed for c in chunk],
                                        [c[2] for c in chunk], m, [c[1] for c in chunk])
                    found = judge.detect_batch(after.cpu())
                    for case, rec, dets in zip(chunk, judge_records(after, chunk_items, judge), found):
                        before = phrase_clauses(case[3])
                        now = phrase_clauses(rec)
                        if kind == "fix":
                            fixed += rec["scores"]["all_clauses"] == 1.0
                            fewer_wrong += sum(c["wrong_attribute"] for c in now) < sum(c["wrong_attribute"] for c in before)
                            lost += sum(c["missing"] for c in now) > 0
                        else:
                            phrase, mask = case[4], case[5].numpy()
                            hits = [d for d in dets if d.shape == phrase.shape]
                            appeared += bool(hits)
                            inside += any((d.mask & mask).sum() >= 0.5 * d.mask.sum() for d in hits)
            n_fix, n_layout = max(len(fix_cases), 1), max(len(layout_cases), 1)
            results["multipliers"][str(m)] = {
                "fixed": fixed / n_fix, "fewer_wrong_attributes": fewer_wrong / n_fix, "lost_an_object": lost / n_fix,
                "missing_shape_appears": appeared / n_layout, "inside_its_mask": inside / n_layout}
            print(m, results["multipliers"][str(m)], flush=True)
    return results


def markdown(results: dict) -> str:
    r = results["control"]
    lines = [f"# Fine stage with oracle inputs (commit {results['commit']})", "",
             f"Validation prompts, base model: {r['items']} first passes; {r['fixable']} fixable (every named object "
             f"drawn, some attribute wrong), {r['layout']} with a named object missing. Strength = multiplier x "
             "DenseDiffusion's (cross 1.0, self 0.3); 0 = plain resampling with the same seed. Oracle inputs: the "
             "judge's masks and descriptions, and for a missing object a disc in free space.", "",
             "| Multiplier | fixed (all clauses) | fewer wrong attributes | lost an object | missing shape appears "
             "| ... inside its mask |", "|---|---|---|---|---|---|"]
    for m, v in r["multipliers"].items():
        lines.append(f"| {m} | {v['fixed']:.3f} | {v['fewer_wrong_attributes']:.3f} | {v['lost_an_object']:.3f} | "
                     f"{v['missing_shape_appears']:.3f} | {v['inside_its_mask']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-category", type=int, default=50)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--multipliers", type=float, nargs="*", default=[0.0, 1.0, 3.0, 10.0])
    p.add_argument("--out", type=Path, default=Path("experiments/results/toyworld_fine_stage_control"))
    a = p.parse_args(argv)
    results = report.new_results("fine_stage_control", vars(a) | {"out": str(a.out)})
    results["control"] = run(a.per_category, a.seeds, a.multipliers)
    print(report.write_report(a.out, results, markdown))


if __name__ == "__main__":
    main()
