"""Compare alignment methods on ToyWorld at the same budget and write a results table.

    python -m t2i_align.commands.toyworld_build .cache/toyworld --natural 2000 --natural-val 512
    python -m t2i_align.studies.compare_methods --out experiments/results/toyworld_methods

1. Each method's experiment is trained with ``t2i-align fit`` on its ``--config`` stack (method config,
   ``configs/experiment/toyworld.yaml``, the method's ToyWorld overlay), skipped when its
   ``runs/<name>/toy_eval.json`` already exists (``--retrain`` forces it). The experiments share the base
   pipeline, the number of generator updates (200) and of images per update (16).
2. The base pipeline and each run's ``last.ckpt`` are evaluated with ``t2i-align validate`` stacked with
   ``configs/eval/toyworld.yaml``: the toy metrics on the compositional evaluation prompts, FID on ToyWorld
   CLIP features (natural validation captions against their renders: is image quality kept?), CLIP score
   and TIFA with the judge. The base model is the "before" of every method (all start from it); the toy
   metrics each fit run measured itself before and after training (``toy_eval.json``) are checked against
   these: the same seeds must give the same numbers.
3. 16 prompts per category (112 images) are the fit runs' own before/after check, too few to tell methods
   apart (one image moves a category by 0.06), so the toy metrics are also measured on every evaluation
   prompt (``--full-per-category``, 100 per category by default) with ``--seeds`` images per prompt (3 by
   default: 2,100 images per model), the same prompts and seeds for every model, and every image's result
   kept (``ToyWorldEvaluation(per_image=True)``). Each method's difference from the base is reported with a
   paired, category-stratified bootstrap 95 % interval (:mod:`t2i_align.stats`): per prompt the mean over
   its seeds, resampled with replacement within each category.
4. ``<out>.json`` holds every metric, the differences with their intervals, the commands and their wall
   times (layout: :mod:`t2i_align.studies.report`); ``<out>.md`` the tables. Finished evaluations of the same
   request are reused (``runs/compare/``, :func:`t2i_align.studies.harness.evaluate`) unless ``--reevaluate``:
   the study can be stopped and started again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from t2i_align.studies import report
from t2i_align.studies.harness import (
    BASE,
    FINETUNE,
    TOYWORLD,
    Model,
    checkpoint,
    evaluate,
    evaluate_toy,
    fit,
    toy_eval,
    training_seed,
)

REFL, ARL = "configs/method/refl.yaml", "configs/method/arl.yaml"
# each stack as its last file's header gives it; the run folder is the stack's trainer.default_root_dir
METHODS = {m.name: m for m in (
    Model("Finetune", (FINETUNE, TOYWORLD), "runs/toyworld_finetune"),
    Model("ReFL (caption reward)", (REFL, TOYWORLD, "configs/experiment/toyworld_refl_caption.yaml"),
          "runs/toyworld_refl_caption"),
    Model("ReFL (CLIP reward)", (REFL, TOYWORLD, "configs/experiment/toyworld_refl_clip.yaml"),
          "runs/toyworld_refl_clip"),
    Model("ReFL (caption reward, CoMat's setup)", (REFL, TOYWORLD, "configs/experiment/toyworld_refl_caption.yaml",
                                                  "configs/experiment/toyworld_refl_caption_wide.yaml"),
          "runs/toyworld_refl_caption_wide"),
    # the two changes of CoMat's setup one at a time: the evaluation's sampler, then CoMat's adapters
    Model("ReFL (caption reward, evaluation sampler)", (REFL, TOYWORLD, "configs/experiment/toyworld_refl_caption.yaml",
                                                       "configs/experiment/toyworld_refl_eval_sampler.yaml"),
          "runs/toyworld_refl_eval_sampler"),
    Model("ReFL (caption reward, CoMat's adapters)", (REFL, TOYWORLD, "configs/experiment/toyworld_refl_caption.yaml",
                                                     "configs/experiment/toyworld_refl_wide_lora.yaml"),
          "runs/toyworld_refl_wide_lora"),
    Model("ARL", (ARL, TOYWORLD, "configs/experiment/toyworld_arl.yaml"), "runs/toyworld_arl"),
    # the positive controls: a colour oracle as ReFL's reward, the judge keeping ARL's candidate
    Model("ReFL (oracle reward)", (REFL, TOYWORLD, "configs/experiment/toyworld_refl_oracle.yaml"),
          "runs/toyworld_refl_oracle"),
    Model("ReFL (oracle reward, CoMat's setup)", (REFL, TOYWORLD, "configs/experiment/toyworld_refl_oracle.yaml",
                                                 "configs/experiment/toyworld_refl_oracle_wide.yaml"),
          "runs/toyworld_refl_oracle_wide"),
    Model("ARL (oracle selection)", (ARL, TOYWORLD, "configs/experiment/toyworld_arl.yaml",
                                     "configs/experiment/toyworld_arl_oracle.yaml"), "runs/toyworld_arl_oracle"),
    Model("ARL (oracle filter)", (ARL, TOYWORLD, "configs/experiment/toyworld_arl.yaml",
                                  "configs/experiment/toyworld_arl_oracle_filter.yaml"), "runs/toyworld_arl_oracle_filter"),
)}
CONSISTENCY_TOLERANCE = 1e-3
markdown = report.markdown  # this study's tables: the comparison against the base


def check_consistency(name: str, toy: dict[str, float], metrics: dict[str, float]) -> None:
    """The fit run's own toy metrics must equal the validate pass's (same prompts, seeds and weights)."""
    bad = {k: (v, metrics.get(f"toy/{k}")) for k, v in toy.items()
           if f"toy/{k}" not in metrics or abs(metrics[f"toy/{k}"] - v) > CONSISTENCY_TOLERANCE}
    if bad:
        raise RuntimeError(f"{name}: toy metrics of the fit and of validate differ: {bad}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", type=Path, default=Path("experiments/results/toyworld_methods"))
    p.add_argument("--retrain", action="store_true", help="fit again even if the run folder has a toy_eval.json")
    p.add_argument("--full-per-category", type=int, default=100,
                   help="evaluation prompts per category for the toy metrics on the full set (0: skip that pass)")
    p.add_argument("--seeds", type=int, default=3, help="images (seeds) per prompt in the full pass")
    p.add_argument("--reevaluate", action="store_true", help="evaluate again even where a finished pass exists")
    p.add_argument("--training-seeds", type=int, nargs="+", default=[0],
                   help="train every method once per seed (0: the configs' own seeds; harness.training_seed)")
    p.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[],
                   help="overrides for every fit (smoke runs only: the table compares the configs' own budget)")
    a = p.parse_args(argv)

    full = a.full_per_category
    settings = {"full_per_category": full, "seeds": a.seeds, "fit_args": a.fit_args, "training_seeds": a.training_seeds}
    results = report.new_results("compare_methods", settings)
    base = report.add_model(results, BASE, validate=evaluate(BASE, reevaluate=a.reevaluate))
    if full:
        base["full_toy"] = evaluate_toy(BASE, full, a.seeds, a.reevaluate)
    for method_model in [training_seed(METHODS[n], seed) for n in a.methods for seed in a.training_seeds]:
        name = method_model.name
        trained = {**fit(method_model, a.fit_args, a.retrain), "toy_eval": toy_eval(method_model.run_dir)}
        model = method_model.replace(checkpoint=str(checkpoint(method_model.run_dir)))
        method = report.add_model(results, model, fit=trained, validate=evaluate(model, reevaluate=a.reevaluate))
        check_consistency(f"{name} before", trained["toy_eval"]["before"], base["validate"]["metrics"])
        check_consistency(f"{name} after", trained["toy_eval"]["after"], method["validate"]["metrics"])
        if full:
            method["full_toy"] = evaluate_toy(model, full, a.seeds, a.reevaluate)
            report.compare(results, BASE.name, name)
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(report.write_report(a.out, results, markdown))


if __name__ == "__main__":
    main()
