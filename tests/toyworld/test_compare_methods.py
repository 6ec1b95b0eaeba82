"""The ToyWorld method-comparison script's bookkeeping: which checkpoint it evaluates, the fit/validate
consistency check, and the table (the training and evaluation themselves are the CLI's, tested elsewhere)."""

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT


@pytest.fixture(scope="module")
def script():
    path = Path(REPO_ROOT) / "experiments" / "toyworld" / "compare_methods.py"
    spec = importlib.util.spec_from_file_location("compare_methods", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_newest_version_checkpoint_is_evaluated(script, tmp_path):
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        script.last_checkpoint(tmp_path)
    for version in (2, 10, 9):
        folder = tmp_path / "logs" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"")
    assert script.last_checkpoint(tmp_path).parts[-3] == "version_10"  # numeric, not lexical order


def test_consistency_check_names_the_metric(script):
    metrics = {"toy/all_clauses": 0.25, "toy/spatial/mg2": 0.5, "fid256_clip128": 3.0}
    script.check_consistency("ok", {"all_clauses": 0.2504, "spatial/mg2": 0.5}, metrics)
    with pytest.raises(RuntimeError, match="spatial/mg2"):
        script.check_consistency("ARL after", {"all_clauses": 0.25, "spatial/mg2": 0.4}, metrics)
    with pytest.raises(RuntimeError, match="tifa"):
        script.check_consistency("missing", {"tifa": 0.1}, metrics)


def test_table_has_a_column_per_model_and_the_quality_rows(script):
    def metrics(level: float) -> dict:
        toy = {f"toy/{k}": level for k in script.SUMMARY}
        toy.update({f"toy/{c}/{m}": level for c in script.CATEGORIES for m in ("all_clauses", "object_accuracy")})
        return {**toy, "tifa_toyjudge/average": level, "clip_toyworld_x100": 50 + level, "fid256_clip128": 9.0,
                "fid256_clip128/seconds": 55.0}

    results = {"base": {"metrics": metrics(0.1)}, "methods": {
        "Finetune": {"validate": {"metrics": metrics(0.2)}, "fit": {"seconds": 300.0}},
        "ARL": {"validate": {"metrics": metrics(0.5)}, "fit": {"seconds": None}}}}
    lines = script.markdown(results).splitlines()
    assert lines[0] == "| Metric | Base | Finetune | ARL |"
    row = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert row["all_clauses (mean over categories)"].endswith("| 0.100 | 0.200 | 0.500 |")
    assert row["FID (fid256_clip128), lower is better"].endswith("| 9.00 | 9.00 | 9.00 |")
    assert row["training wall time (s)"].endswith("| – | 300 | (existing run) |")
    assert len(lines) == 2 + len(script.SUMMARY) + 2 * len(script.CATEGORIES) + 3 + 1


def test_full_prompt_set_pass_keeps_the_eval_configs_sampler(script):
    import json

    import yaml

    [toy] = json.loads(script.full_toy_callbacks(100, 3))
    [configured] = [c for c in yaml.safe_load((Path(REPO_ROOT) / script.EVAL_CONFIG).read_text())["trainer"]["callbacks"]
                    if c["class_path"] == toy["class_path"]]
    changed = {"per_category": 100, "images_per_prompt": 3, "per_image": True, "log_samples": 0}
    assert {k: toy["init_args"][k] for k in changed} == changed
    assert {k: v for k, v in toy["init_args"].items() if k not in changed} == \
        {k: v for k, v in configured["init_args"].items() if k not in changed}


def records_file(path, values: dict) -> str:
    """Per-image records (``ToyWorldEvaluation(per_image=True)``) with the given all_clauses per key."""
    import json

    lines = [json.dumps({"key": key, "category": key.split("/")[0],
                         "scores": {m: value for m in ("all_clauses", "object_accuracy", "object_missing",
                                                       "attribute_wrong")}}) for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_differences_are_paired_per_prompt_over_its_seeds(script, tmp_path):
    keys = [f"{c}/p{i}/{k}" for c in script.CATEGORIES for i in range(10) for k in range(3)]
    base = records_file(tmp_path / "base.jsonl", {key: float(key.endswith("/0")) for key in keys})  # 1 of 3 seeds
    better = {key: float(key.endswith(("/0", "/1")) if key.startswith("color_binding") else key.endswith("/0"))
              for key in keys}
    diffs = script.paired_differences(base, records_file(tmp_path / "m.jsonl", better))
    assert diffs["color_binding/all_clauses"]["difference"] == pytest.approx(1 / 3)
    assert diffs["shape/all_clauses"]["difference"] == 0 and diffs["shape/all_clauses"]["high"] == 0
    assert diffs["all_clauses"]["difference"] == pytest.approx(1 / 21)  # one category of seven
    assert diffs["all_clauses"]["base"] == pytest.approx(1 / 3) and diffs["all_clauses"]["prompts"] == 70


def test_table_puts_the_differences_and_the_full_prompt_set_first(script):
    def metrics(level: float) -> dict:
        return {f"toy/{k}": level for k in script.SUMMARY} | {"tifa_toyjudge/average": level,
                                                               "clip_toyworld_x100": 50.0, "fid256_clip128": 9.0}

    diff = {"base": 0.15, "method": 0.45, "difference": 0.3, "low": 0.25, "high": 0.35}
    keys = ["all_clauses", *[f"{c}/all_clauses" for c in script.CATEGORIES], *script.PAIRED[1:]]
    results = {"full_per_category": 100, "seeds": 3,
               "base": {"metrics": metrics(0.1), "full_toy": {"metrics": metrics(0.15)}},
               "methods": {"ARL": {"validate": {"metrics": metrics(0.5)}, "full_toy": {"metrics": metrics(0.45)},
                                   "fit": {"seconds": 60.0}, "differences": {k: diff for k in keys}}}}
    text = script.markdown(results)
    full, rest = text.split("Every metric of")
    assert "100 evaluation prompts per category x 3 seeds" in full
    assert "| all_clauses (mean over categories) | 0.150 | +0.300 [+0.250, +0.350] |" in full
    assert "| all_clauses (mean over categories) | 0.150 | 0.450 |" in full
    assert "| all_clauses (mean over categories) | 0.100 | 0.500 |" in rest and "FID" in rest and "FID" not in full
