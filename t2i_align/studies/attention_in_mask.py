"""TokenCompose's positive control: where does each noun's cross-attention fall on the model's own images?

    python -m t2i_align.studies.tokencompose_compare                  # the trained arms and their chosen steps
    python -m t2i_align.studies.attention_in_mask --results experiments/results/toyworld_tokencompose_coco.json \
        experiments/results/toyworld_finetune_coco.json

For the base and each arm's chosen checkpoint of a ``val_stopping`` results file, the validation prompts (the
evaluation prompts are not used) are sampled with the evaluation's sampler while the up blocks' cross-attention is
recorded at every step (the conditional branch, head-averaged). Per noun of the prompt that the judge finds drawn
(any object of its shape: the judge's masks are an **oracle** segmentation), the share of its tokens' attention that
falls inside that object's mask, at the 8x8 maps, pooled over layers and steps; ``chance`` is the mask's area share
(what a uniform map gives). TokenCompose trains exactly this share up (L_token): if it rises on the model's own
images and the judged alignment does not, ToyWorld's limit is not the grounding.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from t2i_align.diffusion.attention import cross_attention_layer_names
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.diffusion.tokens import find_phrase
from t2i_align.studies import report
from t2i_align.studies.harness import BASE, Model, checkpoint, load_module
from t2i_align.toyworld.evaluation.scoring import load_items
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.world import parse_prompt

SAMPLING = SamplingSettings(num_inference_steps=25, guidance_scale=5.0)  # the evaluation's sampler
MAP_SIZE = 8


def noun_shares(gen, prompts: list[str], seeds: list[int], judge: ToyJudge) -> list[dict]:
    """Per drawn noun of each prompt: its in-mask attention share and its mask's area share (see the docstring).
    ``gen``: a :class:`~t2i_align.diffusion.generator.Generator` capturing the up blocks' cross-attention."""
    out = gen.sample(prompts, seeds, SAMPLING, record_attention=list(range(SAMPLING.num_inference_steps)))
    maps = sum(torch.stack(out.attention.by_resolution(step)[MAP_SIZE]).mean(0) for step in out.attention.steps)
    rows = []
    for prompt, image_maps, found in zip(prompts, maps.float(), judge.detect_batch(out.images.float().cpu())):
        for occurrence, phrase in enumerate(parse_prompt(prompt).phrases):
            mask = np.zeros(out.images.shape[-2:], dtype=bool)
            for d in found:
                if d.shape == phrase.shape:
                    mask |= d.mask
            if not mask.any():
                continue
            noun = phrase.shape if phrase.count == 1 else phrase.shape + "s"
            earlier = sum(p.shape == phrase.shape and p.count == phrase.count for p in parse_prompt(prompt).phrases[:occurrence])
            positions = list(find_phrase(prompt, noun, gen.tokenizer, earlier))
            cell = F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None, None], MAP_SIZE)[0, 0]  # covered share
            attention = image_maps[..., positions].sum(-1)
            rows.append({"prompt": prompt, "noun": noun, "share": float((attention * cell).sum() / attention.sum()),
                         "chance": float(cell.mean())})
    return rows


def measure(model: Model, per_category: int, batch_size: int = 28) -> dict:
    module, judge = load_module(model), ToyJudge()
    gen = module.generator
    gen.enable_attention_capture(cross_attention_layer_names(gen.unet, ("up_blocks",)))
    items = load_items(".cache/toyworld/prompts/val", per_category=per_category)
    rows = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            rows += noun_shares(gen, [it.prompt for it in batch], [it.seed for it in batch], judge)
    share, chance = np.array([r["share"] for r in rows]), np.array([r["chance"] for r in rows])
    boot = np.random.default_rng(0).integers(0, len(rows), (1000, len(rows)))
    low, high = np.quantile(share[boot].mean(1), [0.025, 0.975])
    return {"nouns": len(rows), "share": float(share.mean()), "interval": [float(low), float(high)],
            "chance": float(chance.mean())}


def models_of(results_paths: list[str | Path], steps: Sequence[int] = ()) -> list[Model]:
    """The base and each arm's chosen checkpoint of one or more ``val_stopping`` results files, and each arm's
    checkpoints of ``steps`` (where the grounding went with more training, whatever validation chose)."""
    models = [BASE]
    for path in results_paths:
        for name, m in json.loads(Path(path).read_text())["models"].items():
            if "curve" not in m:
                continue
            chosen = Model(name, m["configs"], checkpoint=m["checkpoint"], overrides=m.get("overrides", ()))
            models.append(chosen)
            run_dir = m["checkpoint"].split("/logs/")[0]
            models += [chosen.replace(name=f"{m.get('arm', name)} (step {step})",
                                      checkpoint=str(checkpoint(run_dir, step)))
                       for step in steps if step != m.get("step")]
    return models


def markdown(results: dict) -> str:
    lines = [f"# Where each noun's attention falls (commit {results['commit']})", "",
             "Validation prompts, the model's own images; the share of a drawn noun's up-block 8x8 cross-attention "
             "inside its object's mask (the judge's: an oracle), pooled over layers and steps; chance = the mask's "
             "area share.", "", "| Model | nouns | in-mask share [95 %] | chance |", "|---|---|---|---|"]
    for name, m in results["models"].items():
        s = m["attention"]
        lines.append(f"| {name} | {s['nouns']} | {s['share']:.3f} [{s['interval'][0]:.3f}, {s['interval'][1]:.3f}] | "
                     f"{s['chance']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, nargs="+", default=[Path("experiments/results/toyworld_tokencompose.json")],
                   help="val_stopping results files whose chosen checkpoints to measure")
    p.add_argument("--steps", type=int, nargs="*", default=[],
                   help="also each arm's checkpoints of these steps (e.g. the last: did grounding move at all?)")
    p.add_argument("--per-category", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("experiments/results/toyworld_attention_in_mask"))
    a = p.parse_args(argv)
    results = report.new_results("attention_in_mask", {"results": [str(r) for r in a.results], "steps": a.steps,
                                                      "per_category": a.per_category})
    for model in models_of(a.results, a.steps):
        report.add_model(results, model, attention=measure(model, a.per_category))
        print(model.name, results["models"][model.name]["attention"], flush=True)
    print(report.write_report(a.out, results, markdown))


if __name__ == "__main__":
    main()
