"""The fine-stage study's choices (t2i_align.studies.fine_stage_compare): the coarse-stage model is the arm with the
best validation score at its chosen step, the fine stage keeps the generator settings of its stack (a whole-UNet
checkpoint loads into a whole-UNet FineStage), and the study put together with stand-in passes (the passes are the
harness's, tested in test_harness.py)."""

import json

import pytest

from t2i_align.studies import fine_stage_compare as study
from t2i_align.studies import report
from tests.test_configs import config_args, parse_only

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def candidates_file(path):
    def arm(step, values, configs):
        return {"configs": configs, "checkpoint": f"runs/{configs[-1]}/logs/version_0/x-step={step}.ckpt", "step": step,
                "curve": {str(s): {"all_clauses": {"method": v}} for s, v in values.items()}}

    models = {"Base": {"configs": ["base.yaml"], "checkpoint": None},
              "A (step 100)": arm(100, {0: 0.1, 100: 0.15, 200: 0.4}, ["a"]),  # 0.4 is not A's chosen step
              "B (step 200)": arm(200, {0: 0.1, 100: 0.12, 200: 0.2}, ["b"])}
    path.write_text(json.dumps({"models": models}))
    return path


def test_the_coarse_model_is_the_best_arm_on_validation_at_its_chosen_step(tmp_path):
    chosen, score = study.coarse_candidate(candidates_file(tmp_path / "r.json"))
    assert chosen.name == "B (step 200)" and score == 0.2 and chosen.configs == ("b",)
    assert chosen.checkpoint.endswith("step=200.ckpt")


def test_the_fine_stage_takes_the_generator_settings_of_the_checkpoint(tmp_path):
    import torch

    whole, lora = tmp_path / "whole.ckpt", tmp_path / "lora.ckpt"
    torch.save({"state_dict": {"generator.unet.conv_in.weight": torch.zeros(1)}}, whole)
    torch.save({"state_dict": {"generator.unet.x.lora_A.default.weight": torch.zeros(1)}}, lora)
    for ckpt, expected in ((whole, None), (lora, 4), (None, 4)):
        parsed = parse_only(config_args(*[c.removeprefix("configs/") for c in study.fine_configs(ckpt)]))
        assert parsed["model"]["class_path"].endswith("FineStage")
        settings = parsed["model"]["init_args"]["generator"]["lora"]
        assert (settings and settings["rank"]) == expected, ckpt


def metrics(level: float) -> dict:
    return {"toy/all_clauses": level, "toy/seconds": 10 * level, "fid256_clip128": 4.0 + level,
            "clip_toyworld_x100": 60.0, "tifa_toyjudge/average": level}


def test_before_and_after_on_the_base_and_the_coarse_model(tmp_path, monkeypatch):
    # all_clauses: the base 0.1, the coarse model 0.2; the fine stage adds 0.05
    candidates = candidates_file(tmp_path / "candidates.json")
    (tmp_path / "b.ckpt").write_bytes(b"")
    passes = []

    def level(model):
        return (0.2 if model.checkpoint else 0.1) + (0.05 if model.name.endswith(study.FINE_STAGE) else 0)

    def evaluate(model, callbacks=None, label="eval", reevaluate=False):
        passes.append((model.name, model.configs, model.checkpoint))
        return {"command": "v", "seconds": 1.0, "metrics": metrics(level(model)), "checkpoint": model.checkpoint,
                "root": "r", "per_image": None}

    def evaluate_toy(model, per_category, seeds, reevaluate=False):
        path = tmp_path / f"{model.slug}.jsonl"
        path.write_text("".join(json.dumps({"key": f"{c}/p{i}/{k}", "category": c,
                                            "scores": dict.fromkeys(report.PAIRED, level(model))}) + "\n"
                                for c in report.CATEGORIES for i in range(per_category) for k in range(seeds)))
        return {"command": "t", "seconds": 1.0, "metrics": metrics(level(model)), "checkpoint": model.checkpoint,
                "root": "r", "per_image": str(path)}

    grids = []
    monkeypatch.setattr(study, "evaluate", evaluate)
    monkeypatch.setattr(study, "evaluate_toy", evaluate_toy)
    monkeypatch.setattr(study, "fine_configs", lambda ckpt: study.FINE + (("whole",) if ckpt else ()))
    monkeypatch.setattr(study, "grid", lambda model, out: grids.append((model, out)))
    out = tmp_path / "fine"
    study.main(["--candidates", str(candidates), "--out", str(out), "--full-per-category", "2", "--seeds", "2"])

    results = json.loads(out.with_suffix(".json").read_text())
    coarse = "B (step 200)"
    assert list(results["models"]) == ["Base", "Base + fine stage", coarse, coarse + " + fine stage"]
    assert results["models"][coarse]["validation_all_clauses"] == 0.2
    assert results["models"][coarse + " + fine stage"]["configs"] == [*study.FINE, "whole"]
    assert results["models"]["Base"]["seconds_per_image"] == pytest.approx(1.0 / (7 * 2 * 2))  # toy/seconds / images
    assert [(c["base"], c["method"]) for c in results["comparisons"]] == [
        ("Base", "Base + fine stage"), (coarse, coarse + " + fine stage"), ("Base", coarse + " + fine stage")]
    both = report.comparison(results, "Base", coarse + " + fine stage")
    assert both["all_clauses"]["difference"] == pytest.approx(0.15)
    [(shown, grid_file)] = grids
    assert shown.name == coarse + " + fine stage" and shown.checkpoint.endswith("step=200.ckpt")
    assert grid_file == tmp_path / "fine_grid.png"
    text = out.with_suffix(".md").read_text()
    assert text == study.markdown(results)
    assert f"Coarse-stage model: {coarse} (validation all_clauses 0.200, the best of `{candidates}`)." in text
    assert "| Base (plain) | Base (+ fine stage) | B (step 200) (plain) | B (step 200) (+ fine stage) |" in text
    assert "| fid256_clip128 | 4.10 | 4.15 | 4.20 | 4.25 |" in text

    study.main(["--base-only", "--out", str(out), "--full-per-category", "2", "--seeds", "2"])
    results = json.loads(out.with_suffix(".json").read_text())
    assert list(results["models"]) == ["Base", "Base + fine stage"] and results["settings"]["candidates"] is None
    assert "Coarse-stage" not in out.with_suffix(".md").read_text() and grids[-1][0].checkpoint is None
