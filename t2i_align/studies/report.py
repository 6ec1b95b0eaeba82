"""The one results layout of every study, its paired comparisons, and the one writer of ``<out>.json`` + ``<out>.md``.

``<out>.json``::

    {"study": "<module>", "commit": "<git HEAD>",
     "settings": {...},      # the options the numbers depend on (prompts per category, seeds, budget, ...)
     "models": {             # every model evaluated, in table order; the first is the base of the tables
       "<name>": {"configs": [...], "checkpoint": "<path>" | null,
                  "fit": {"command", "seconds"[, "toy_eval"]} | null,        # when the study trained it
                  "validate": <pass> | null,   # every metric of configs/eval/toyworld.yaml
                  "full_toy": <pass> | null,   # the toy metrics on the full prompt set, every image kept
                  ...}},                       # what a study adds (val_stopping: arm, curve, step)
     "comparisons": [{"base": "<model>", "method": "<model>", "differences": {"<key>": <paired difference>}}]}

``<pass>`` is :func:`~t2i_align.studies.harness.evaluate`'s ``{"command", "seconds", "metrics", "checkpoint", "root",
"per_image"}``; a paired difference is :class:`~t2i_align.stats.PairedDifference` as a dict. ``<out>.md`` is made
from the JSON alone (:func:`write_report`), by the study's own composition of the tables here.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from collections.abc import Callable, Mapping

from t2i_align.io import atomic_path
from t2i_align.stats import paired_bootstrap, per_prompt_means
from t2i_align.studies.harness import Model
from t2i_align.toyworld.splits import EVAL_CATEGORIES

CATEGORIES = EVAL_CATEGORIES
#: Toy metrics of the tables (means over categories).
SUMMARY = ("all_clauses", "object_accuracy", "mg2", "mg3", "mg4", "tifa")
#: Metrics whose differences get paired intervals (per-image values of the full pass); all_clauses also per category.
PAIRED = ("all_clauses", "object_accuracy", "object_missing", "attribute_wrong")
DIFFERENCE_KEYS = ("all_clauses", *[f"{c}/all_clauses" for c in CATEGORIES], *PAIRED[1:])


def git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def new_results(study: str, settings: dict) -> dict:
    return {"study": study, "commit": git_commit(), "settings": settings, "models": {}, "comparisons": []}


def add_model(results: dict, model: Model, **entry) -> dict:
    """The model's entry (``fit``, ``validate`` and ``full_toy`` None until given), added to ``results``."""
    results["models"][model.name] = {"configs": list(model.configs), "overrides": list(model.overrides),
                                     "checkpoint": model.checkpoint, "fit": None,
                                     "validate": None, "full_toy": None, **entry}
    return results["models"][model.name]


# ---------------------------------------------------------------------------------------- comparisons
def read_records(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def paired_differences(base_records: str | Path, method_records: str | Path) -> dict:
    """``method - base`` with a 95 % paired, category-stratified bootstrap interval (:mod:`t2i_align.stats`: per
    prompt the mean over its seeds) of each metric in :data:`PAIRED` (mean over categories) and of all_clauses per
    category, from two per-image record files of the same prompts and seeds."""
    base, method = read_records(base_records), read_records(method_records)
    out = {}
    for metric in PAIRED:
        a, b = per_prompt_means(base, metric), per_prompt_means(method, metric)
        out[metric] = vars(paired_bootstrap(a, b))
        if metric == "all_clauses":
            for category in CATEGORIES:
                out[f"{category}/{metric}"] = vars(paired_bootstrap(a, b, category=category))
    return out


def compare(results: dict, base: str, method: str) -> dict:
    """Adds the comparison of two models of ``results`` (their full passes' records) and returns its differences."""
    models = results["models"]
    differences = paired_differences(models[base]["full_toy"]["per_image"], models[method]["full_toy"]["per_image"])
    results["comparisons"].append({"base": base, "method": method, "differences": differences})
    return differences


def comparison(results: dict, base: str, method: str) -> dict:
    """The differences of ``method - base`` in ``results``."""
    [found] = [c for c in results["comparisons"] if (c["base"], c["method"]) == (base, method)]
    return found["differences"]


# -------------------------------------------------------------------------------------------- tables
def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def metric_table(metrics: Mapping[str, Mapping[str, float]], rows: list[tuple[str, str, int]]) -> list[str]:
    """One column per entry of ``metrics`` (label -> metrics), one row per ``(key, label, digits)``."""
    columns = list(metrics)
    lines = ["| Metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key, label, digits in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(metrics[c].get(key), digits) for c in columns) + " |")
    return lines


def difference_table(columns: Mapping[str, Mapping[str, dict]]) -> list[str]:
    """The base's value (of the first column's comparison) and one column of differences with their intervals per
    entry of ``columns`` (label -> differences)."""
    labels = list(columns)
    lines = ["| Metric | Base | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for key in DIFFERENCE_KEYS:
        first = columns[labels[0]][key]
        cells = [f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                 for d in (columns[c][key] for c in labels)]
        label = key if "/" in key else f"{key} (mean over categories)"
        lines.append(f"| {label} | {first['base']:.3f} | " + " | ".join(cells) + " |")
    return lines


def toy_rows() -> list[tuple[str, str, int]]:
    rows = [(f"toy/{k}", f"{k} (mean over categories)", 3) for k in SUMMARY]
    rows += [(f"toy/{c}/all_clauses", f"{c}: all_clauses", 3) for c in CATEGORIES]
    return rows + [(f"toy/{c}/object_accuracy", f"{c}: object_accuracy", 3) for c in CATEGORIES]


def quality_keys(metrics: Mapping[str, float]) -> list[str]:
    """The FID and CLIP-score keys of a validate pass (their names carry the feature and the model)."""
    return [k for k in metrics if k.startswith(("fid", "clip_")) and not k.endswith("/seconds")]


def training_row(models: Mapping[str, dict]) -> str:
    cells = ["–" if m["fit"] is None else "(existing run)" if m["fit"]["seconds"] is None
             else fmt(m["fit"]["seconds"], 0) for m in models.values()]
    return "| training wall time (s) | " + " | ".join(cells) + " |"


def markdown(results: dict) -> str:
    """The tables of a comparison against the first model: with a full pass, the differences with their intervals
    and the toy metrics on the full prompt set first; then every metric of ``configs/eval/toyworld.yaml`` and the
    training wall times."""
    models, settings = results["models"], results["settings"]
    base = next(iter(models))
    metrics = {name: m["validate"]["metrics"] for name, m in models.items()}
    lines = []
    if settings.get("full_per_category"):
        n, seeds = settings["full_per_category"], settings["seeds"]
        lines += [f"Difference from the base on {n} evaluation prompts per category x {seeds} seeds (the same for "
                  "every model), with paired bootstrap 95 % intervals (prompts resampled within categories):", ""]
        lines += difference_table({c["method"]: c["differences"] for c in results["comparisons"] if c["base"] == base})
        lines += ["", f"Toy metrics on {n} evaluation prompts per category x {seeds} seeds:", ""]
        lines += metric_table({name: m["full_toy"]["metrics"] for name, m in models.items()}, toy_rows())
        lines += ["", "Every metric of `configs/eval/toyworld.yaml` (toy metrics on 16 prompts per category, 1 seed):",
                  ""]
    fid_key = next(k for k in quality_keys(metrics[base]) if k.startswith("fid"))
    clip_key = next(k for k in quality_keys(metrics[base]) if k.startswith("clip_"))
    rows = toy_rows() + [("tifa_toyjudge/average", "TIFA (judge as VQA, first 32 prompts)", 3),
                         (clip_key, f"CLIP score ({clip_key})", 2), (fid_key, f"FID ({fid_key}), lower is better", 2)]
    lines += metric_table(metrics, rows)
    lines.append(training_row(models))
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, results: dict, compose: Callable[[dict], str] = markdown) -> str:
    """Writes ``<out>.json`` (``results``) and ``<out>.md`` (``compose(results)``, the study's tables), each
    atomically; returns the Markdown."""
    out = Path(out)
    text = compose(results)
    for suffix, content in ((".json", json.dumps(results, indent=2) + "\n"), (".md", text)):
        with atomic_path(out.with_suffix(suffix)) as tmp:
            tmp.write_text(content)
    return text
