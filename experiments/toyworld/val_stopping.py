"""Compare training arms on ToyWorld with each arm's stopping step chosen on held-out validation prompts, then score
the chosen checkpoints against the base on the evaluation prompts. Used by ``comat_ablation.py`` and
``tokencompose_compare.py`` (each gives its arms, output and budget):

1. Every arm (``name -> (--config stack, run folder)``) is trained with ``t2i-align fit`` on its stack followed by
   ``configs/eval/toyworld_val.yaml`` for ``--max-steps`` generator updates: the toy metrics on the validation
   prompts (50 per category, disjoint from the evaluation and training prompts) at step 0 and every 100 steps,
   every image's verdicts and every 100-step checkpoint kept. A run whose ``toy_eval.json`` reached
   ``--max-steps`` (or went further: its later steps are ignored) is reused (``--retrain`` forces it).
2. Each arm's stopping step is the saved step (> 0) with the highest validation ``all_clauses`` (mean over
   categories; the earlier step on a tie). The learning curve is reported with paired bootstrap intervals
   against step 0, so a choice made on noise shows as an interval that includes 0. The evaluation prompts
   play no part in the choice.
3. The base and each arm's chosen checkpoint are then scored exactly as ``compare_methods.py`` scores
   methods: every metric of ``configs/eval/toyworld.yaml`` (FID on ToyWorld CLIP features, CLIP score, TIFA)
   and the toy metrics on every evaluation prompt with ``--seeds`` images each, with paired bootstrap 95 %
   intervals against the base (the same prompts and seeds for every model).
4. ``<out>.json`` holds everything (commands, wall times, curves, choices); ``<out>.md`` the tables;
   ``<out>_grid.png`` the first 32 evaluation samples of the base (top) and of the last arm (bottom), same
   prompts and seeds. Finished evaluations are reused (``runs/compare/``) unless ``--reevaluate``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import (  # noqa: E402  (the sibling script: same passes, same table)
    METHODS, config_args, full_pass, full_toy_callbacks, git_commit, markdown, paired_differences, validate,
)

from t2i_align.io import atomic_path  # noqa: E402
from t2i_align.stats import paired_bootstrap, per_prompt_means  # noqa: E402

VAL_CONFIG = "configs/eval/toyworld_val.yaml"
CURVE_METRICS = ("all_clauses", "object_missing", "attribute_wrong")


def fit(configs: list[str], run_dir: Path, max_steps: int, retrain: bool) -> dict:
    """Train the arm with validation curves unless a run that reached ``max_steps`` exists."""
    report, timing = run_dir / "toy_eval.json", run_dir / "fit_seconds.json"
    command = ["t2i-align", "fit", *config_args([*configs, VAL_CONFIG]), f"--trainer.max_steps={max_steps}"]
    # a longer run is reused: its checkpoints up to max_steps are those of a run of max_steps (constant lr)
    if retrain or not report.exists() or json.loads(report.read_text())["step"] < max_steps:
        start = time.time()
        subprocess.run(command, check=True)
        with atomic_path(timing) as tmp:
            tmp.write_text(json.dumps({"seconds": round(time.time() - start, 1)}) + "\n")
    seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else None
    return {"command": shlex.join(command), "seconds": seconds}


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def learning_curve(run_dir: Path, max_steps: int | None = None) -> dict[int, dict]:
    """``step -> {metric: {value, difference from step 0 with its paired interval}}`` from the validation
    records of the fit (``toy_eval/per_image_step_<N>.jsonl``), up to ``max_steps``."""
    paths = {int(re.fullmatch(r"per_image_step_(\d+)\.jsonl", p.name).group(1)): p
             for p in (run_dir / "toy_eval").glob("per_image_step_*.jsonl")}
    paths = {step: p for step, p in paths.items() if max_steps is None or step <= max_steps}
    if 0 not in paths:
        raise FileNotFoundError(f"{run_dir}/toy_eval: no per_image_step_0.jsonl (fit with {VAL_CONFIG})")
    start = read_records(paths[0])
    curve = {}
    for step in sorted(paths):
        records = read_records(paths[step])
        curve[step] = {m: vars(paired_bootstrap(per_prompt_means(start, m), per_prompt_means(records, m)))
                       for m in CURVE_METRICS}
    return curve


def choose_step(curve: dict[int, dict]) -> int:
    """The trained step with the highest validation all_clauses (the earliest on a tie)."""
    trained = [s for s in sorted(curve) if s > 0]
    if not trained:
        raise ValueError("no validation after training started: was the fit shorter than val_check_interval?")
    return max(trained, key=lambda s: (curve[s]["all_clauses"]["method"], -s))


def checkpoint_at(run_dir: Path, step: int) -> Path:
    """The newest logger version's checkpoint of ``step`` (``ModelCheckpoint``'s ``...step=<N>.ckpt``)."""
    found = sorted(run_dir.glob(f"logs/version_*/checkpoints/*step={step}.ckpt"),
                   key=lambda p: int(p.parts[-3].split("_")[1]))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint of step {step} under logs/version_*/checkpoints")
    return found[-1]


def curve_table(results: dict) -> list[str]:
    steps = sorted({int(s) for arm in results["arms"].values() for s in arm["curve"]})
    lines = ["| Arm | " + " | ".join(f"step {s}" for s in steps) + " | chosen |", "|---|" + "---|" * (len(steps) + 1)]
    for name, arm in results["arms"].items():
        cells = []
        for s in steps:
            d = arm["curve"].get(str(s), arm["curve"].get(s))
            if d is None:
                cells.append("–")
                continue
            d = d["all_clauses"]
            cells.append(f"{d['method']:.3f}" if s == 0 else
                         f"{d['method']:.3f} ({d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}])")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {arm['step']} |")
    return lines


def stack_grids(top: Path, bottom: Path, out: Path) -> None:
    from PIL import Image

    a, b = Image.open(top).convert("RGB"), Image.open(bottom).convert("RGB")
    grid = Image.new("RGB", (max(a.width, b.width), a.height + b.height + 8), (255, 255, 255))
    grid.paste(a, (0, 0))
    grid.paste(b, (0, a.height + 8))
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")


def main(arms: dict[str, tuple[list[str], str]], out: str, max_steps: int, description: str,
         argv: list[str] | None = None) -> None:
    """The command line of a study: ``arms`` and the defaults of ``--out`` and ``--max-steps``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="*", default=list(arms), choices=list(arms))
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--max-steps", type=int, default=max_steps, help="generator updates of every arm (the budget)")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--full-per-category", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--reevaluate", action="store_true")
    a = p.parse_args(argv)

    for name in a.arms:  # all training first: the choices are made before any evaluation prompt is generated
        configs, run_dir = arms[name]
        fit(configs, Path(run_dir), a.max_steps, a.retrain)
    base_configs = METHODS["Finetune"][0]  # zero-initialised LoRA, no checkpoint: the base
    full = full_toy_callbacks(a.full_per_category, a.seeds)
    results: dict = {"base": validate(base_configs, None, Path("runs/compare/base")), "max_steps": a.max_steps,
                     "full_per_category": a.full_per_category, "seeds": a.seeds, "commit": git_commit(),
                     "arms": {}, "methods": {}}
    results["base"]["full_toy"] = full_pass(base_configs, None, Path("runs/compare/base_full"), full, a.reevaluate)
    for name in a.arms:
        configs, run_dir = arms[name]
        trained = fit(configs, Path(run_dir), a.max_steps, False)
        curve = learning_curve(Path(run_dir), a.max_steps)
        step = choose_step(curve)
        ckpt = checkpoint_at(Path(run_dir), step)
        results["arms"][name] = {"configs": configs, "curve": curve, "step": step, "checkpoint": str(ckpt)}
        root = Path("runs/compare") / f"{Path(run_dir).name}_step{step}"
        method = {"configs": configs, "checkpoint": str(ckpt), "root": str(root), "fit": trained,
                  "validate": validate(configs, ckpt, root),
                  "full_toy": full_pass(configs, ckpt, Path(f"{root}_full"), full, a.reevaluate)}
        method["differences"] = paired_differences(results["base"]["full_toy"]["per_image"],
                                                   method["full_toy"]["per_image"])
        results["methods"][f"{name} (step {step})"] = method
        print(f"{name}: step {step} evaluated", file=sys.stderr, flush=True)

    lines = ["Validation all_clauses (mean over categories, 50 validation prompts per category, 1 seed) along "
             "training, with the difference from step 0 and its paired 95 % interval; 'chosen' = the stopping step:",
             "", *curve_table(results), "", markdown(results)]
    text = "\n".join(lines)
    for suffix, content in ((".json", json.dumps(results, indent=2) + "\n"), (".md", text)):
        with atomic_path(a.out.with_suffix(suffix)) as tmp:
            tmp.write_text(content)
    roots = [Path("runs/compare/base"), Path(results["methods"][list(results["methods"])[-1]]["root"])]
    grids = [sorted(root.glob("samples/toy/step_*.png")) for root in roots]
    if all(grids):
        stack_grids(grids[0][-1], grids[1][-1], a.out.parent / f"{a.out.name}_grid.png")
    print(text)
