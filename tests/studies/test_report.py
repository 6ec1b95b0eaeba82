"""The one results layout: the paired comparison of two full passes, the tables, the writer, and the committed
results (each study's Markdown made from its committed JSON is what the committed .md holds)."""

import importlib
import json
from pathlib import Path

import pytest

from t2i_align.studies import report
from t2i_align.studies.harness import BASE, Model
from tests.helpers import REPO_ROOT

RESULTS = Path(REPO_ROOT) / "experiments" / "results"
STUDY_FILES = ["toyworld_methods", "toyworld_comat_ablation", "toyworld_tokencompose", "toyworld_fine_stage"]


def metrics(level: float, full: bool = True) -> dict:
    toy = {f"toy/{k}": level for k in report.SUMMARY}
    if full:
        toy.update({f"toy/{c}/{m}": level for c in report.CATEGORIES for m in ("all_clauses", "object_accuracy")})
    return {**toy, "tifa_toyjudge/average": level, "clip_toyworld_x100": 50 + level, "fid256_clip128": 9.0,
            "fid256_clip128/seconds": 55.0}


def results_of(models: dict, settings: dict | None = None, comparisons=()) -> dict:
    return {"study": "test", "commit": None, "settings": settings or {}, "models": models,
            "comparisons": list(comparisons)}


def test_table_has_a_column_per_model_and_the_quality_rows():
    results = results_of({"Base": {"validate": {"metrics": metrics(0.1)}, "fit": None},
                          "Finetune": {"validate": {"metrics": metrics(0.2)}, "fit": {"seconds": 300.0}},
                          "ARL": {"validate": {"metrics": metrics(0.5)}, "fit": {"seconds": None}}})
    lines = report.markdown(results).splitlines()
    assert lines[0] == "| Metric | Base | Finetune | ARL |"
    row = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert row["all_clauses (mean over categories)"].endswith("| 0.100 | 0.200 | 0.500 |")
    assert row["FID (fid256_clip128), lower is better"].endswith("| 9.00 | 9.00 | 9.00 |")
    assert row["CLIP score (clip_toyworld_x100)"].endswith("| 50.10 | 50.20 | 50.50 |")
    assert row["training wall time (s)"].endswith("| – | 300 | (existing run) |")
    assert len(lines) == 2 + len(report.SUMMARY) + 2 * len(report.CATEGORIES) + 3 + 1


def records_file(path, values: dict) -> str:
    """Per-image records (``ToyWorldEvaluation(per_image=True)``) with the given value of every paired metric."""
    lines = [json.dumps({"key": key, "category": key.split("/")[0], "scores": {m: value for m in report.PAIRED}})
             for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_differences_are_paired_per_prompt_over_its_seeds(tmp_path):
    keys = [f"{c}/p{i}/{k}" for c in report.CATEGORIES for i in range(10) for k in range(3)]
    base = records_file(tmp_path / "base.jsonl", {key: float(key.endswith("/0")) for key in keys})  # 1 of 3 seeds
    better = {key: float(key.endswith(("/0", "/1")) if key.startswith("color_binding") else key.endswith("/0"))
              for key in keys}
    diffs = report.paired_differences(base, records_file(tmp_path / "m.jsonl", better))
    assert diffs["color_binding/all_clauses"]["difference"] == pytest.approx(1 / 3)
    assert diffs["shape/all_clauses"]["difference"] == 0 and diffs["shape/all_clauses"]["high"] == 0
    assert diffs["all_clauses"]["difference"] == pytest.approx(1 / 21)  # one category of seven
    assert diffs["all_clauses"]["base"] == pytest.approx(1 / 3) and diffs["all_clauses"]["prompts"] == 70
    assert list(diffs) == list(report.DIFFERENCE_KEYS)

    results = report.new_results("test", {})
    report.add_model(results, BASE, full_toy={"per_image": base})
    method = Model("M", ("m.yaml",), checkpoint="m.ckpt")
    report.add_model(results, method, full_toy={"per_image": str(tmp_path / "m.jsonl")})
    assert report.compare(results, "Base", "M") == diffs
    assert results["comparisons"] == [{"base": "Base", "method": "M", "differences": diffs}]
    assert report.comparison(results, "Base", "M") == diffs
    assert results["models"]["M"] == {"configs": ["m.yaml"], "overrides": [], "checkpoint": "m.ckpt", "fit": None, "validate": None,
                                      "full_toy": {"per_image": str(tmp_path / "m.jsonl")}}


def test_table_puts_the_differences_and_the_full_prompt_set_first():
    diff = {"base": 0.15, "method": 0.45, "difference": 0.3, "low": 0.25, "high": 0.35}
    models = {"Base": {"validate": {"metrics": metrics(0.1, False)}, "full_toy": {"metrics": metrics(0.15, False)},
                       "fit": None},
              "ARL": {"validate": {"metrics": metrics(0.5, False)}, "full_toy": {"metrics": metrics(0.45, False)},
                      "fit": {"seconds": 60.0}}}
    results = results_of(models, {"full_per_category": 100, "seeds": 3},
                         [{"base": "Base", "method": "ARL", "differences": {k: diff for k in report.DIFFERENCE_KEYS}}])
    text = report.markdown(results)
    full, rest = text.split("Every metric of")
    assert "100 evaluation prompts per category x 3 seeds" in full
    assert "| all_clauses (mean over categories) | 0.150 | +0.300 [+0.250, +0.350] |" in full
    assert "| all_clauses (mean over categories) | 0.150 | 0.450 |" in full
    assert "| all_clauses (mean over categories) | 0.100 | 0.500 |" in rest and "FID" in rest and "FID" not in full


def test_the_writer_makes_the_markdown_from_the_json_alone(tmp_path):
    results = results_of({"Base": {"validate": {"metrics": metrics(0.1)}, "fit": None}})
    text = report.write_report(tmp_path / "out", results, lambda r: f"{len(r['models'])} model\n")
    assert text == "1 model\n" == (tmp_path / "out.md").read_text()
    assert json.loads((tmp_path / "out.json").read_text()) == results
    assert report.write_report(tmp_path / "standard", results) == report.markdown(results)


@pytest.mark.parametrize("name", STUDY_FILES)
def test_committed_results_have_the_layout_and_their_tables(name):
    results = json.loads((RESULTS / f"{name}.json").read_text())
    assert set(results) == {"study", "commit", "settings", "models", "comparisons"}
    assert next(iter(results["models"])) == BASE.name
    for model in results["models"].values():
        assert {"configs", "checkpoint", "fit", "validate", "full_toy"} <= set(model)
        for stage in ("validate", "full_toy"):
            assert set(model[stage]) == {"command", "seconds", "metrics", "checkpoint", "root", "per_image"}
            assert model[stage]["checkpoint"] == model["checkpoint"]
    for comparison in results["comparisons"]:
        assert {comparison["base"], comparison["method"]} <= set(results["models"])
        assert list(comparison["differences"]) == list(report.DIFFERENCE_KEYS)
    study = importlib.import_module(f"t2i_align.studies.{results['study']}")
    # the committed .md may add prose around the tables (where results came from, later analyses)
    assert study.markdown(results) in (RESULTS / f"{name}.md").read_text()
