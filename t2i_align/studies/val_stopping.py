"""Compare training arms on ToyWorld with each arm's stopping step chosen on held-out validation prompts, then score
the chosen checkpoints against the base on the evaluation prompts. The kind of study of ``comat_ablation`` and
``tokencompose_compare`` (each declares its arms, output and budget and calls :func:`main`):

1. Every arm (a :class:`~t2i_align.studies.harness.Model` with its run folder) is trained with ``t2i-align fit`` on
   its stack followed by ``configs/eval/toyworld_val.yaml`` for ``--max-steps`` generator updates: the toy metrics
   on the validation prompts (50 per category x 3 seeds, disjoint from the evaluation and training prompts) at step 0 and
   every 100 steps, every image's verdicts and every 100-step checkpoint kept. A run whose ``toy_eval.json``
   reached ``--max-steps`` (or went further: its later steps are ignored) is reused (``--retrain`` forces it).
2. Each arm's stopping step is the saved step (> 0) with the highest validation ``all_clauses`` (mean over
   categories; the earlier step on a tie). The learning curve is reported with paired bootstrap intervals
   against step 0, so a choice made on noise shows as an interval that includes 0. The evaluation prompts
   play no part in the choice.
3. The base and each arm's chosen checkpoint are then scored exactly as ``compare_methods`` scores methods: every
   metric of ``configs/eval/toyworld.yaml`` (FID on ToyWorld CLIP features, CLIP score, TIFA) and the toy metrics
   on every evaluation prompt with ``--seeds`` images each, with paired bootstrap 95 % intervals against the base
   (the same prompts and seeds for every model).
4. ``<out>.json`` holds everything (commands, wall times, curves, choices; layout: :mod:`t2i_align.studies.report`);
   ``<out>.md`` the tables; ``<out>_grid.png`` the first 32 evaluation samples of the base (top) and of the last
   arm (bottom), same prompts and seeds. Finished evaluations of the same request are reused (``runs/compare/``)
   unless ``--reevaluate``.

``--validation-only`` stops after step 2 and reports the curves and choices alone: for tuning a setting among arms
(CoMat's mixed-latent range and ratio) on the validation prompts, before the chosen one joins a study.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from t2i_align.io import atomic_path
from t2i_align.stats import paired_bootstrap, per_prompt_means
from t2i_align.studies import report
from t2i_align.studies.harness import (
    BASE, VAL_CONFIG, Model, checkpoint, evaluate, evaluate_toy, fit, training_seed,
)

CURVE_METRICS = ("all_clauses", "object_missing", "attribute_wrong")


def learning_curve(run_dir: str | Path, max_steps: int | None = None) -> dict[int, dict]:
    """``step -> {metric: {value, difference from step 0 with its paired interval}}`` from the validation
    records of the fit (``toy_eval/per_image_step_<N>.jsonl``), up to ``max_steps``."""
    paths = {int(re.fullmatch(r"per_image_step_(\d+)\.jsonl", p.name).group(1)): p
             for p in (Path(run_dir) / "toy_eval").glob("per_image_step_*.jsonl")}
    paths = {step: p for step, p in paths.items() if max_steps is None or step <= max_steps}
    if 0 not in paths:
        raise FileNotFoundError(f"{run_dir}/toy_eval: no per_image_step_0.jsonl (fit with {VAL_CONFIG})")
    start = report.read_records(paths[0])
    curve = {}
    for step in sorted(paths):
        records = report.read_records(paths[step])
        curve[step] = {m: vars(paired_bootstrap(per_prompt_means(start, m), per_prompt_means(records, m)))
                       for m in CURVE_METRICS}
    return curve


def choose_step(curve: Mapping[int, dict]) -> int:
    """The trained step with the highest validation all_clauses (the earliest on a tie)."""
    trained = [s for s in sorted(curve) if s > 0]
    if not trained:
        raise ValueError("no validation after training started: was the fit shorter than val_check_interval?")
    return max(trained, key=lambda s: (curve[s]["all_clauses"]["method"], -s))


def curve_table(results: dict) -> list[str]:
    """Validation all_clauses of every arm at every step, with the difference from step 0, and the chosen step."""
    arms = [m for m in results["models"].values() if "curve" in m]
    steps = sorted({int(s) for arm in arms for s in arm["curve"]})
    lines = ["| Arm | " + " | ".join(f"step {s}" for s in steps) + " | chosen |", "|---|" + "---|" * (len(steps) + 1)]
    for arm in arms:
        cells = []
        for s in steps:
            d = arm["curve"].get(str(s))
            if d is None:
                cells.append("–")
                continue
            d = d["all_clauses"]
            cells.append(f"{d['method']:.3f}" if s == 0 else
                         f"{d['method']:.3f} ({d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}])")
        lines.append(f"| {arm['arm']} | " + " | ".join(cells) + f" | {arm['step']} |")
    return lines


def validation_seeds() -> int:
    """Images per validation prompt of :data:`VAL_CONFIG`'s ToyWorld evaluation."""
    import yaml

    [toy] = [c for c in yaml.safe_load(Path(VAL_CONFIG).read_text())["trainer"]["callbacks"]
             if c["class_path"].endswith("ToyWorldEvaluation")]
    return int(toy["init_args"].get("images_per_prompt", 1))


def validation_markdown(results: dict) -> str:
    """The validation curves and chosen steps of every arm (all that ``--validation-only`` reports)."""
    seeds = results["settings"].get("validation_seeds", 1)  # results from before it was recorded used 1
    return "\n".join([f"Validation all_clauses (mean over categories, 50 validation prompts per category, {seeds} "
                      f"seed{'s' if seeds > 1 else ''}) along training, with the difference from step 0 and its "
                      "paired 95 % interval; 'chosen' = the stopping step:", "", *curve_table(results), ""])


def markdown(results: dict) -> str:
    return "\n".join([validation_markdown(results), report.markdown(results)])


def stack_grids(top: Path, bottom: Path, out: Path) -> None:
    from PIL import Image

    a, b = Image.open(top).convert("RGB"), Image.open(bottom).convert("RGB")
    grid = Image.new("RGB", (max(a.width, b.width), a.height + b.height + 8), (255, 255, 255))
    grid.paste(a, (0, 0))
    grid.paste(b, (0, a.height + 8))
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")


def main(arms: Mapping[str, Model], out: str, max_steps: int, description: str, study: str,
         argv: list[str] | None = None) -> None:
    """The command line of a study: its ``arms`` (name -> model with its run folder), the defaults of ``--out`` and
    ``--max-steps``, its description and name."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="*", default=list(arms), choices=list(arms))
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--max-steps", type=int, default=max_steps, help="generator updates of every arm (the budget)")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--full-per-category", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--reevaluate", action="store_true")
    p.add_argument("--training-seeds", type=int, nargs="+", default=[0],
                   help="train every arm once per seed (0: the configs' own seeds; harness.training_seed)")
    p.add_argument("--validation-only", action="store_true",
                   help="train and report the validation curves and chosen steps only (tuning a setting): nothing is "
                        "generated for the evaluation prompts")
    a = p.parse_args(argv)

    runs = {training_seed(arms[name], seed).name: training_seed(arms[name], seed)
            for name in a.arms for seed in a.training_seeds}
    fit_args = ["--config", VAL_CONFIG, f"--trainer.max_steps={a.max_steps}"]
    for arm in runs.values():  # all training first: the choices are made before any evaluation prompt is generated
        fit(arm, fit_args, a.retrain, min_step=a.max_steps)
    if a.validation_only:
        results = report.new_results(study, {"max_steps": a.max_steps, "validation_seeds": validation_seeds(),
                                             "training_seeds": a.training_seeds, "validation_only": True})
        for name, arm in runs.items():
            curve = learning_curve(arm.run_dir, a.max_steps)
            report.add_model(results, arm, fit=fit(arm, fit_args, min_step=a.max_steps), arm=name,
                             curve={str(s): v for s, v in curve.items()}, step=choose_step(curve))
        print(report.write_report(a.out, results, validation_markdown))
        return
    results = report.new_results(study, {"max_steps": a.max_steps, "full_per_category": a.full_per_category,
                                         "seeds": a.seeds, "validation_seeds": validation_seeds(),
                                         "training_seeds": a.training_seeds})
    report.add_model(results, BASE, validate=evaluate(BASE, reevaluate=a.reevaluate),
                     full_toy=evaluate_toy(BASE, a.full_per_category, a.seeds, a.reevaluate))
    for name, arm in runs.items():
        trained = fit(arm, fit_args, min_step=a.max_steps)  # found: the record of the fit above
        curve = learning_curve(arm.run_dir, a.max_steps)
        step = choose_step(curve)
        model = arm.replace(name=f"{name} (step {step})", checkpoint=str(checkpoint(arm.run_dir, step)))
        report.add_model(results, model, fit=trained, validate=evaluate(model, reevaluate=a.reevaluate),
                         full_toy=evaluate_toy(model, a.full_per_category, a.seeds, a.reevaluate),
                         arm=name, curve={str(s): v for s, v in curve.items()}, step=step)
        report.compare(results, BASE.name, model.name)
        print(f"{name}: step {step} evaluated", file=sys.stderr, flush=True)

    text = report.write_report(a.out, results, markdown)
    roots = [Path(m["validate"]["root"]) for m in (results["models"][BASE.name], list(results["models"].values())[-1])]
    grids = [sorted(root.glob("samples/toy/step_*.png")) for root in roots]
    if all(grids):
        stack_grids(grids[0][-1], grids[1][-1], a.out.parent / f"{a.out.name}_grid.png")
    print(text)


if __name__ == "__main__":
    sys.exit("val_stopping is the kind of study of comat_ablation and tokencompose_compare, with no arms of its own: "
             "run python -m t2i_align.studies.comat_ablation (or tokencompose_compare)")
