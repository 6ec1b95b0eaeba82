"""The method comparison (t2i_align.studies.compare_methods): the fit/validate consistency check and the study put
together, training and evaluation replaced by stand-ins (they are the harness's, tested in test_harness.py)."""

import json
from types import SimpleNamespace

import pytest

from t2i_align.studies import compare_methods, harness, report


def test_consistency_check_names_the_metric():
    metrics = {"toy/all_clauses": 0.25, "toy/spatial/mg2": 0.5, "fid256_clip128": 3.0}
    compare_methods.check_consistency("ok", {"all_clauses": 0.2504, "spatial/mg2": 0.5}, metrics)
    with pytest.raises(RuntimeError, match="spatial/mg2"):
        compare_methods.check_consistency("ARL after", {"all_clauses": 0.25, "spatial/mg2": 0.4}, metrics)
    with pytest.raises(RuntimeError, match="tifa"):
        compare_methods.check_consistency("missing", {"tifa": 0.1}, metrics)


def metrics(level: float) -> dict:
    toy = {f"toy/{k}": level for k in report.SUMMARY}
    toy.update({f"toy/{c}/{m}": level for c in report.CATEGORIES for m in ("all_clauses", "object_accuracy")})
    return {**toy, "tifa_toyjudge/average": level, "clip_toyworld_x100": 50 + level, "fid256_clip128": 9.0}


@pytest.fixture
def study(tmp_path, monkeypatch):
    """The study with two methods whose runs live in tmp_path, the base at 0.1 and every trained model at 0.3; the
    passes it asked for are in ``study.passes``."""
    passes, methods = [], {}
    for name in ("Finetune", "ARL"):
        run = tmp_path / name
        (run / "logs" / "version_3" / "checkpoints").mkdir(parents=True)
        (run / "logs" / "version_3" / "checkpoints" / "last.ckpt").write_bytes(b"")
        (run / "toy_eval.json").write_text(json.dumps({"before": {"all_clauses": 0.1}, "after": {"all_clauses": 0.3},
                                                       "step": 200}))
        methods[name] = harness.Model(name, (f"{name}.yaml",), str(run))
    monkeypatch.setattr(compare_methods, "METHODS", methods)

    def level(model):
        return 0.1 if model.checkpoint is None else 0.3

    def evaluate(model, callbacks=None, label="eval", reevaluate=False):
        passes.append((model.name, model.checkpoint, "validate"))
        return {"command": "v", "seconds": 1.0, "metrics": metrics(level(model)), "checkpoint": model.checkpoint,
                "root": "r", "per_image": None}

    def evaluate_toy(model, per_category, seeds, reevaluate=False):
        passes.append((model.name, model.checkpoint, f"toy {per_category}x{seeds}"))
        path = tmp_path / f"{model.slug}.jsonl"
        path.write_text("".join(json.dumps({"key": f"{c}/p{i}/{k}", "category": c,
                                            "scores": dict.fromkeys(report.PAIRED, level(model))}) + "\n"
                                for c in report.CATEGORIES for i in range(2) for k in range(seeds)))
        return {"command": "t", "seconds": 2.0, "metrics": metrics(level(model)), "checkpoint": model.checkpoint,
                "root": "r", "per_image": str(path)}

    monkeypatch.setattr(compare_methods, "evaluate", evaluate)
    monkeypatch.setattr(compare_methods, "evaluate_toy", evaluate_toy)
    monkeypatch.setattr(compare_methods, "fit",
                        lambda model, args, retrain: {"command": f"fit {args}", "seconds": None})
    return SimpleNamespace(passes=passes)


def test_every_method_is_trained_checked_and_compared_with_the_base(tmp_path, study):
    out = tmp_path / "methods"
    compare_methods.main(["--out", str(out), "--full-per-category", "5", "--seeds", "2", "--fit-args", "--x=1"])
    ckpt = str(tmp_path / "Finetune" / "logs" / "version_3" / "checkpoints" / "last.ckpt")
    assert study.passes[:4] == [("Base", None, "validate"), ("Base", None, "toy 5x2"), ("Finetune", ckpt, "validate"),
                                ("Finetune", ckpt, "toy 5x2")]
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["settings"] == {"full_per_category": 5, "seeds": 2, "fit_args": ["--x=1"],
                                   "training_seeds": [0]}
    assert list(results["models"]) == ["Base", "Finetune", "ARL"]
    base = results["models"]["Base"]
    assert base["configs"] == list(harness.BASE.configs) and base["fit"] is None
    finetune = results["models"]["Finetune"]
    assert finetune["checkpoint"] == ckpt and finetune["fit"]["command"] == "fit ['--x=1']"
    assert finetune["fit"]["toy_eval"]["after"] == {"all_clauses": 0.3}
    assert [c["method"] for c in results["comparisons"]] == ["Finetune", "ARL"]
    assert results["comparisons"][1]["differences"]["all_clauses"]["difference"] == pytest.approx(0.2)
    text = out.with_suffix(".md").read_text()
    assert text == compare_methods.markdown(results) and "| training wall time (s) | – | (existing run) |" in text


def test_without_the_full_pass_there_are_no_differences(tmp_path, study):
    compare_methods.main(["--out", str(tmp_path / "m"), "--full-per-category", "0", "--methods", "ARL"])
    results = json.loads((tmp_path / "m.json").read_text())
    assert results["comparisons"] == [] and results["models"]["ARL"]["full_toy"] is None
    assert [p[2] for p in study.passes] == ["validate", "validate"]


def test_a_fit_that_disagrees_with_validate_stops_the_study(tmp_path, study):
    (tmp_path / "ARL" / "toy_eval.json").write_text(json.dumps({"before": {"all_clauses": 0.1},
                                                                "after": {"all_clauses": 0.5}, "step": 200}))
    with pytest.raises(RuntimeError, match="ARL after"):
        compare_methods.main(["--out", str(tmp_path / "m"), "--methods", "ARL"])
