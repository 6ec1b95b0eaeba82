"""RealignDiff's fine stage on ToyWorld (the paper's Table II claim: the fine stage improves attribute binding and
relations on top of the coarse stage): before (plain sampling, which is the fine stage's first pass) and after (its
second pass) on the base and on the best coarse-stage model, the same evaluation prompts and seeds::

    python -m t2i_align.commands.toyworld_build .cache/toyworld --natural 2000 --natural-val 512
    python -m t2i_align.studies.tokencompose_compare      # the trained candidates and their chosen checkpoints
    python -m t2i_align.studies.fine_stage_compare --out experiments/results/toyworld_fine_stage

* The fine stage uses ToyWorld's tagger, likelihood judge and segmenter
  (``configs/experiment/toyworld_fine_stage.yaml``), which are the evaluation judge itself: every "after" number is
  an **oracle upper bound** of what real experts give.
* The coarse-stage model is the trained checkpoint with the best *validation* all_clauses among the arms of
  ``--candidates`` (a results JSON of a ``val_stopping`` study; the evaluation prompts play no part in the choice).
  The ReFL caption-reward LoRA, RealignDiff's own coarse stage, made ToyWorld worse at our budget (README), so it is
  not the best one.
* Each model is scored as ``compare_methods`` scores methods: every metric of ``configs/eval/toyworld.yaml`` and the
  toy metrics on every evaluation prompt x ``--seeds`` images, paired bootstrap 95 % intervals of after - before
  (and of the coarse model + fine stage - the base). Wall time per image of one pass (plain) and two passes (the
  fine stage) is the full pass's own (``toy/seconds``: generating and judging), on whatever else the machine ran.
* ``<out>.json`` has everything (layout: :mod:`t2i_align.studies.report`); ``<out>.md`` the tables;
  ``<out>_grid.png`` the first pass, the kept objects' masks (green: certain, yellow: may, red: unlikely) and the
  second pass for one prompt per category (the coarse model; the base with ``--base-only``). Finished passes of the
  same request are reused (``runs/compare/``) unless ``--reevaluate``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from t2i_align.io import atomic_path
from t2i_align.studies import report
from t2i_align.studies.harness import (
    BASE, EVAL_CONFIG, TOYWORLD, Model, evaluate, evaluate_toy, toy_pass_callbacks,
)

FINE = ("configs/method/fine_stage.yaml", TOYWORLD, "configs/experiment/toyworld_fine_stage.yaml")
FULL_UNET = "configs/model/full_unet.yaml"  # generator.lora: null, for a whole-UNet checkpoint
FINE_STAGE = " + fine stage"  # the name of a model with the fine stage: its plain model's name and this


def coarse_candidate(results_path: str | Path) -> tuple[Model, float]:
    """The arm of a ``val_stopping`` results file with the best validation all_clauses at its chosen step, as a model
    named as there (``<arm> (step <N>)``), and that score."""
    models = json.loads(Path(results_path).read_text())["models"]
    scores = {name: m["curve"][str(m["step"])]["all_clauses"]["method"] for name, m in models.items() if "curve" in m}
    name = max(scores, key=scores.get)
    return (Model(name, models[name]["configs"], checkpoint=models[name]["checkpoint"],
                  overrides=models[name].get("overrides", ())), scores[name])


def fine_configs(ckpt: str | None) -> tuple[str, ...]:
    """The fine stage with the generator settings of ``ckpt``: the base's LoRA, or ``lora: null`` for a checkpoint of
    the whole UNet (no LoRA weights in it)."""
    if ckpt is None:
        return FINE
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return FINE + (() if any("lora_" in k for k in state) else (FULL_UNET,))


def markdown(results: dict) -> str:
    """The after - before tables of every model, both stages - the base, and the quality metrics and timings."""
    models, settings = results["models"], results["settings"]
    n, seeds = settings["full_per_category"], settings["seeds"]
    plain = [c["base"] for c in results["comparisons"] if c["method"] == c["base"] + FINE_STAGE]
    coarse = next((name for name, m in models.items() if "validation_all_clauses" in m), None)
    lines = ["The fine stage's experts are the ToyWorld judge: every 'after' is an **oracle upper bound**.", ""]
    if coarse:
        score = models[coarse]["validation_all_clauses"]
        lines += [f"Coarse-stage model: {coarse} (validation all_clauses {score:.3f}, "
                  f"the best of `{settings['candidates']}`).", ""]
    for name in plain:
        lines += [f"{name}: after (fine stage) - before (plain sampling), {n} prompts per category x {seeds} seeds, "
                  "paired 95 % intervals:", ""]
        lines += [*report.difference_table({"+ fine stage": report.comparison(results, name, name + FINE_STAGE)}), ""]
    if coarse:
        lines += [f"{coarse} + fine stage - the base (both stages against the base):", ""]
        lines += [*report.difference_table({"two stages": report.comparison(results, BASE.name, coarse + FINE_STAGE)}),
                  ""]
    columns = {f"{name} ({stage})": models[name + suffix] for name in plain
               for stage, suffix in (("plain", ""), ("+ fine stage", FINE_STAGE))}
    lines += ["| Metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    metrics = [m["validate"]["metrics"] for m in columns.values()]
    for key in [*report.quality_keys(metrics[0]), "tifa_toyjudge/average"]:
        lines.append(f"| {key} | " + " | ".join(report.fmt(m.get(key), 2) for m in metrics) + " |")
    lines.append("| seconds per image (full pass) | " + " | ".join(
        report.fmt(m["seconds_per_image"], 3) for m in columns.values()) + " |")
    return "\n".join(lines) + "\n"


def seconds_per_image(full_toy: dict) -> float:
    """The pass's own time (its ``toy/seconds``: generating and judging, no start-up) per image."""
    images = len(Path(full_toy["per_image"]).read_text().splitlines())
    return full_toy["metrics"]["toy/seconds"] / images


def grid(model: Model, out: Path, seed: int = 0) -> None:
    """First pass, masks (each kept object's mask tinted by its score) and second pass, one prompt per category, with
    the evaluation's sampler settings."""
    from PIL import Image

    from t2i_align.cli import T2ICLI

    callbacks = json.dumps(toy_pass_callbacks(1, 1))
    with warnings.catch_warnings():  # args given while the study has its own command line: on purpose
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = T2ICLI(args=[*model.args(), "--config", EVAL_CONFIG, "--trainer.logger=false",
                           f"--trainer.callbacks={callbacks}"], run=False)
    [toy] = [c for c in cli.trainer.callbacks if type(c).__name__ == "ToyWorldEvaluation"]
    module = cli.model.eval()
    if model.checkpoint:
        state = torch.load(model.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state, strict=False)
    prompts = [(Path(toy.prompts_dir) / f"{c}.txt").read_text().splitlines()[0] for c in report.CATEGORIES]
    seeds = [seed] * len(prompts)
    with torch.no_grad():
        first = module.generator.sample(prompts, seeds, toy.sampling).images.float()
        second = module.sample(prompts, seeds, toy.sampling).images.float()
    masks = torch.zeros_like(first)
    colours = {"certain": (0.2, 1.0, 0.2), "may": (1.0, 0.8, 0.1), "unlikely": (1.0, 0.2, 0.2)}
    for i, objects in enumerate(module.last_objects):
        for o in objects:
            masks[i][:, o.mask] = torch.tensor(colours[o.label])[:, None]
    rows = [torch.cat(list(x), dim=2) for x in (first, 0.5 * first + 0.5 * masks, second)]
    image = torch.cat(rows, dim=1).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
    with atomic_path(out) as tmp:
        Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(tmp, format="PNG")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=Path, default=Path("experiments/results/toyworld_tokencompose.json"))
    p.add_argument("--out", type=Path, default=Path("experiments/results/toyworld_fine_stage"))
    p.add_argument("--full-per-category", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--reevaluate", action="store_true")
    p.add_argument("--base-only", action="store_true", help="the base model alone (before the candidates exist)")
    a = p.parse_args(argv)

    coarse, score = (None, None) if a.base_only else coarse_candidate(a.candidates)
    settings = {"full_per_category": a.full_per_category, "seeds": a.seeds,
                "candidates": None if a.base_only else str(a.candidates)}
    results = report.new_results("fine_stage_compare", settings)
    for plain in [BASE] + ([coarse] if coarse else []):
        fine = Model(plain.name + FINE_STAGE, fine_configs(plain.checkpoint), checkpoint=plain.checkpoint)
        for model in (plain, fine):
            entry = report.add_model(results, model, validate=evaluate(model, reevaluate=a.reevaluate),
                                     full_toy=evaluate_toy(model, a.full_per_category, a.seeds, a.reevaluate))
            entry["seconds_per_image"] = seconds_per_image(entry["full_toy"])
            print(f"{model.name}: done", file=sys.stderr, flush=True)
        report.compare(results, plain.name, fine.name)
    if coarse:
        results["models"][coarse.name]["validation_all_clauses"] = score
        report.compare(results, BASE.name, coarse.name + FINE_STAGE)
    text = report.write_report(a.out, results, markdown)
    shown = coarse or BASE
    grid(Model(shown.name + FINE_STAGE, fine_configs(shown.checkpoint), checkpoint=shown.checkpoint),
         a.out.parent / f"{a.out.name}_grid.png")
    print(text)


if __name__ == "__main__":
    main()
