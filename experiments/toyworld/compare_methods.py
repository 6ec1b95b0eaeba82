"""Compare alignment methods on ToyWorld at the same budget and write a results table.

    python -m t2i_align.commands.toyworld_build .cache/toyworld --natural 2000 --natural-val 512
    python experiments/toyworld/compare_methods.py --out experiments/results/toyworld_methods

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
   times; ``<out>.md`` the tables. Finished evaluations are reused (``runs/compare/<run>_full``) unless
   ``--reevaluate``: the script can be stopped and started again.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

from t2i_align.io import atomic_path
from t2i_align.stats import paired_bootstrap, per_prompt_means

EVAL_CONFIG = "configs/eval/toyworld.yaml"
TOYWORLD = "configs/experiment/toyworld.yaml"
# name -> (the experiment's --config stack, as its last file's header gives it; the run folder, which is the
# stack's trainer.default_root_dir)
METHODS = {
    "Finetune": (["configs/method/finetune.yaml", TOYWORLD], "runs/toyworld_finetune"),
    "ReFL (caption reward)": (["configs/method/refl.yaml", TOYWORLD, "configs/experiment/toyworld_refl_caption.yaml"],
                              "runs/toyworld_refl_caption"),
    "ReFL (CLIP reward)": (["configs/method/refl.yaml", TOYWORLD, "configs/experiment/toyworld_refl_clip.yaml"],
                           "runs/toyworld_refl_clip"),
    "ARL": (["configs/method/arl.yaml", TOYWORLD, "configs/experiment/toyworld_arl.yaml"], "runs/toyworld_arl"),
}
CATEGORIES = ("color_binding", "shape", "texture", "size", "spatial", "counting", "multi_object")
SUMMARY = ("all_clauses", "object_accuracy", "mg2", "mg3", "mg4", "tifa")
CONSISTENCY_TOLERANCE = 1e-3
# Metrics whose differences from the base get intervals (per-image values from the full pass).
PAIRED = ("all_clauses", "object_accuracy", "object_missing", "attribute_wrong")


def last_checkpoint(run_dir: Path) -> Path:
    """``last.ckpt`` of the newest logger version of ``run_dir`` (the fit this script just ran or found)."""
    found = sorted(run_dir.glob("logs/version_*/checkpoints/last.ckpt"), key=lambda p: int(p.parts[-3].split("_")[1]))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no logs/version_*/checkpoints/last.ckpt (did the fit finish?)")
    return found[-1]


def config_args(configs: list[str]) -> list[str]:
    return [arg for config in configs for arg in ("--config", config)]


def fit(configs: list[str], run_dir: Path, retrain: bool, extra: list[str]) -> dict:
    """Train unless the run exists; its wall time is kept in ``run_dir/fit_seconds.json`` for later tables."""
    report, timing = run_dir / "toy_eval.json", run_dir / "fit_seconds.json"
    command = ["t2i-align", "fit", *config_args(configs), *extra]
    if retrain or not report.exists():
        start = time.time()
        subprocess.run(command, check=True)
        with atomic_path(timing) as tmp:
            tmp.write_text(json.dumps({"seconds": round(time.time() - start, 1)}) + "\n")
    seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else None
    return {"command": shlex.join(command), "seconds": seconds, "toy_eval": json.loads(report.read_text())}


def full_toy_callbacks(per_category: int, seeds: int) -> str:
    """``trainer.callbacks`` for the toy metrics alone on ``per_category`` prompts of each category with
    ``seeds`` images per prompt and per-image records (the toy evaluation of ``EVAL_CONFIG`` otherwise: same
    prompts folder and sampler)."""
    import yaml

    [toy] = [c for c in yaml.safe_load(Path(EVAL_CONFIG).read_text())["trainer"]["callbacks"]
             if c["class_path"].endswith("ToyWorldEvaluation")]
    toy = {**toy, "init_args": {**toy["init_args"], "per_category": per_category, "images_per_prompt": seeds,
                                "per_image": True, "log_samples": 0}}
    return json.dumps([toy], separators=(",", ":"))


def full_pass(configs: list[str], ckpt: Path | None, root: Path, callbacks: str, reevaluate: bool) -> dict:
    """The per-image toy pass of one model, reused from ``root`` when it finished before."""
    done = root / "full_pass.json"
    if done.exists() and not reevaluate:
        result = json.loads(done.read_text())
        if result["checkpoint"] == (str(ckpt) if ckpt else None):
            return result
    for old in root.glob("toy_eval/per_image_step_*.jsonl"):
        old.unlink()
    result = validate(configs, ckpt, root, callbacks)
    [records] = list(root.glob("toy_eval/per_image_step_*.jsonl"))
    result.update({"checkpoint": str(ckpt) if ckpt else None, "per_image": str(records)})
    with atomic_path(done) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def paired_differences(base_records: Path, method_records: Path) -> dict:
    """``method - base`` with a 95 % paired bootstrap interval: the mean over categories of each metric in
    ``PAIRED`` and ``all_clauses`` per category."""
    read = lambda path: [json.loads(line) for line in Path(path).read_text().splitlines()]  # noqa: E731
    base, method = read(base_records), read(method_records)
    out = {}
    for metric in PAIRED:
        a, b = per_prompt_means(base, metric), per_prompt_means(method, metric)
        out[metric] = vars(paired_bootstrap(a, b))
        if metric == "all_clauses":
            for category in CATEGORIES:
                out[f"{category}/{metric}"] = vars(paired_bootstrap(a, b, category=category))
    return out


def validate(configs: list[str], ckpt: Path | None, root: Path, callbacks: str | None = None) -> dict:
    """Every metric of ``configs/eval/toyworld.yaml`` for the model of the ``configs`` stack (``ckpt``: trained
    weights); ``callbacks`` (a JSON list) replaces that stack's callbacks."""
    from t2i_align.cli import T2ICLI

    args = [*config_args(configs), "--config", EVAL_CONFIG, "--trainer.logger=false", f"--trainer.default_root_dir={root}"]
    if callbacks is not None:
        args.append(f"--trainer.callbacks={callbacks}")
    command = shlex.join(["t2i-align", "validate", *args] + ([f"--ckpt_path={ckpt}"] if ckpt else []))
    start = time.time()
    cli = T2ICLI(args=args, run=False)
    [metrics] = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt) if ckpt else None)
    return {"command": command, "seconds": round(time.time() - start, 1),
            "metrics": {k.removeprefix("val/"): float(v) for k, v in metrics.items()}}


def check_consistency(name: str, toy: dict[str, float], metrics: dict[str, float]) -> None:
    """The fit run's own toy metrics must equal the validate pass's (same prompts, seeds and weights)."""
    bad = {k: (v, metrics.get(f"toy/{k}")) for k, v in toy.items()
           if f"toy/{k}" not in metrics or abs(metrics[f"toy/{k}"] - v) > CONSISTENCY_TOLERANCE}
    if bad:
        raise RuntimeError(f"{name}: toy metrics of the fit and of validate differ: {bad}")


def git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(columns: list[str], metrics: dict[str, dict], rows: list[tuple[str, str, int]]) -> list[str]:
    lines = ["| Metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key, label, digits in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(metrics[c].get(key), digits) for c in columns) + " |")
    return lines


def difference_table(results: dict) -> list[str]:
    methods = list(results["methods"])
    lines = ["| Metric | Base | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    keys = ["all_clauses", *[f"{c}/all_clauses" for c in CATEGORIES], *PAIRED[1:]]
    for key in keys:
        first = results["methods"][methods[0]]["differences"][key]
        cells = [f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                 for d in (results["methods"][m]["differences"][key] for m in methods)]
        label = key if "/" in key else f"{key} (mean over categories)"
        lines.append(f"| {label} | {first['base']:.3f} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    columns = ["Base", *results["methods"]]
    metrics = {"Base": results["base"]["metrics"], **{n: r["validate"]["metrics"] for n, r in results["methods"].items()}}
    fid_key = next(k for k in metrics["Base"] if k.startswith("fid") and not k.endswith("/seconds"))
    clip_key = next(k for k in metrics["Base"] if k.startswith("clip_") and not k.endswith("/seconds"))
    toy_rows = [(f"toy/{k}", f"{k} (mean over categories)", 3) for k in SUMMARY]
    toy_rows += [(f"toy/{c}/all_clauses", f"{c}: all_clauses", 3) for c in CATEGORIES]
    toy_rows += [(f"toy/{c}/object_accuracy", f"{c}: object_accuracy", 3) for c in CATEGORIES]
    lines = []
    if results.get("full_per_category"):
        n, seeds = results["full_per_category"], results["seeds"]
        lines += [f"Difference from the base on {n} evaluation prompts per category x {seeds} seeds (the same for "
                  "every model), with paired bootstrap 95 % intervals (prompts resampled within categories):", ""]
        lines += difference_table(results)
        full = {"Base": results["base"]["full_toy"]["metrics"],
                **{n: r["full_toy"]["metrics"] for n, r in results["methods"].items()}}
        lines += ["", f"Toy metrics on {n} evaluation prompts per category x {seeds} seeds:", ""]
        lines += table(columns, full, toy_rows)
        lines += ["", "Every metric of `configs/eval/toyworld.yaml` (toy metrics on 16 prompts per category, 1 seed):", ""]
    rows = toy_rows + [("tifa_toyjudge/average", "TIFA (judge as VQA, first 32 prompts)", 3),
                       (clip_key, f"CLIP score ({clip_key})", 2), (fid_key, f"FID ({fid_key}), lower is better", 2)]
    lines += table(columns, metrics, rows)
    train = ["–"] + [fmt(r["fit"]["seconds"], 0) if r["fit"]["seconds"] is not None else "(existing run)"
                     for r in results["methods"].values()]
    lines.append("| training wall time (s) | " + " | ".join(train) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", type=Path, default=Path("experiments/results/toyworld_methods"))
    p.add_argument("--retrain", action="store_true", help="fit again even if the run folder has a toy_eval.json")
    p.add_argument("--full-per-category", type=int, default=100,
                   help="evaluation prompts per category for the toy metrics on the full set (0: skip that pass)")
    p.add_argument("--seeds", type=int, default=3, help="images (seeds) per prompt in the full pass")
    p.add_argument("--reevaluate", action="store_true", help="evaluate again even where a finished pass exists")
    p.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[],
                   help="overrides for every fit (smoke runs only: the table compares the configs' own budget)")
    a = p.parse_args(argv)

    base_configs = METHODS["Finetune"][0]  # its LoRA starts at zero: validate without a checkpoint = the base
    full = full_toy_callbacks(a.full_per_category, a.seeds) if a.full_per_category else None
    results: dict = {"base": validate(base_configs, None, Path("runs/compare/base")), "fit_args": a.fit_args,
                     "full_per_category": a.full_per_category, "seeds": a.seeds, "commit": git_commit(),
                     "methods": {}}
    if full:
        results["base"]["full_toy"] = full_pass(base_configs, None, Path("runs/compare/base_full"), full, a.reevaluate)
    for name in a.methods:
        configs, run_dir = METHODS[name]
        trained = fit(configs, Path(run_dir), a.retrain, a.fit_args)
        ckpt = last_checkpoint(Path(run_dir))
        evaluated = validate(configs, ckpt, Path("runs/compare") / Path(run_dir).name)
        check_consistency(f"{name} before", trained["toy_eval"]["before"], results["base"]["metrics"])
        check_consistency(f"{name} after", trained["toy_eval"]["after"], evaluated["metrics"])
        results["methods"][name] = {"configs": configs, "checkpoint": str(ckpt), "fit": trained, "validate": evaluated}
        if full:
            root = Path("runs/compare") / f"{Path(run_dir).name}_full"
            method = results["methods"][name]
            method["full_toy"] = full_pass(configs, ckpt, root, full, a.reevaluate)
            method["differences"] = paired_differences(results["base"]["full_toy"]["per_image"],
                                                       method["full_toy"]["per_image"])
        print(f"{name}: done", file=sys.stderr, flush=True)

    table = markdown(results)
    for suffix, text in ((".json", json.dumps(results, indent=2) + "\n"), (".md", table)):
        with atomic_path(a.out.with_suffix(suffix)) as tmp:
            tmp.write_text(text)
    print(table)


if __name__ == "__main__":
    main()
