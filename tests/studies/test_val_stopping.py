"""The validation-stopping studies' bookkeeping (t2i_align.studies.val_stopping): the learning curve from the
validation records, the choice of the stopping step (validation only, a trained step), and the study put together
(training and evaluation replaced by stand-ins: they are the harness's, tested in test_harness.py)."""

import json
from pathlib import Path

import pytest

from t2i_align.studies import comat_ablation, harness, report, tokencompose_compare, val_stopping

CATEGORIES = ("color_binding", "shape")


def metrics(level: float) -> dict:
    """Every metric a validate pass logs, all at ``level``."""
    toy = {f"toy/{k}": level for k in report.SUMMARY}
    toy.update({f"toy/{c}/{m}": level for c in report.CATEGORIES for m in ("all_clauses", "object_accuracy")})
    return {**toy, "tifa_toyjudge/average": level, "clip_toyworld_x100": 50 + level, "fid256_clip128": 9.0}


def write_step(run_dir: Path, step: int, value_of) -> None:
    """Validation records of ``step``: all_clauses = value_of(category, prompt index), 5 prompts x 1 seed."""
    folder = run_dir / "toy_eval"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"key": f"{c}/p{i}/0", "category": c,
                         "scores": {"all_clauses": value_of(c, i), "object_missing": 0.0, "attribute_wrong": 0.0}})
             for c in CATEGORIES for i in range(5)]
    (folder / f"per_image_step_{step}.jsonl").write_text("\n".join(lines) + "\n")


def test_learning_curve_is_paired_against_step_zero(tmp_path):
    write_step(tmp_path, 0, lambda c, i: float(i < 1))  # 0.2 in both categories
    write_step(tmp_path, 100, lambda c, i: float(i < 3) if c == "color_binding" else float(i < 1))  # +0.4 in one
    write_step(tmp_path, 200, lambda c, i: 0.0)
    curve = val_stopping.learning_curve(tmp_path)
    assert sorted(curve) == [0, 100, 200]
    assert curve[0]["all_clauses"]["difference"] == 0
    assert curve[100]["all_clauses"]["method"] == pytest.approx(0.4)
    assert curve[100]["all_clauses"]["difference"] == pytest.approx(0.2)
    assert curve[200]["all_clauses"]["difference"] == pytest.approx(-0.2) and curve[200]["all_clauses"]["low"] < 0
    assert val_stopping.choose_step(curve) == 100
    assert sorted(val_stopping.learning_curve(tmp_path, max_steps=100)) == [0, 100]  # a longer run's later steps


def test_curve_needs_the_step_zero_records(tmp_path):
    write_step(tmp_path, 100, lambda c, i: 0.0)
    with pytest.raises(FileNotFoundError, match="per_image_step_0"):
        val_stopping.learning_curve(tmp_path)


def point(value: float) -> dict:
    return {"all_clauses": {"method": value}}


def test_stopping_step_is_a_trained_step_earliest_on_ties():
    assert val_stopping.choose_step({0: point(0.9), 100: point(0.1), 200: point(0.2)}) == 200  # never the base itself
    assert val_stopping.choose_step({0: point(0.1), 100: point(0.3), 200: point(0.3), 300: point(0.2)}) == 100
    with pytest.raises(ValueError, match="val_check_interval"):
        val_stopping.choose_step({0: point(0.1)})


def test_the_studies_declare_their_arms():
    assert list(comat_ablation.ARMS)[:4] == ["CA", "CA+FP", "CA+FP+AC", "CA+FP+AC+ML"]
    assert list(tokencompose_compare.ARMS)[:2] == ["Finetune (whole UNet)", "TokenCompose"]
    assert comat_ablation.markdown is tokencompose_compare.markdown is val_stopping.markdown


class Stand:
    """Stand-ins for the harness's fit and evaluation passes: what they were asked, and per-image records in which
    model ``i`` (in order of evaluation) scores ``i / 10`` everywhere."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path, self.fits, self.passes = tmp_path, [], []

    def fit(self, model, args=(), retrain=False, min_step=None):
        self.fits.append((model.name, list(args), retrain, min_step))
        return {"command": f"t2i-align fit {model.name}", "seconds": 10.0}

    def evaluate(self, model, callbacks=None, label="eval", reevaluate=False, root=None, eval_config=None):
        self.passes.append((model.name, model.checkpoint, "validate", reevaluate))
        root = self.tmp_path / "compare" / model.slug
        (root / "samples" / "toy").mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.new("RGB", (4, 4)).save(root / "samples" / "toy" / "step_0.png")
        return {"command": "validate", "seconds": 1.0, "metrics": metrics(0.1), "checkpoint": model.checkpoint,
                "root": str(root), "per_image": None}

    def evaluate_toy(self, model, per_category, seeds, reevaluate=False):
        self.passes.append((model.name, model.checkpoint, f"toy {per_category}x{seeds}", reevaluate))
        level = len({name for name, *_ in self.passes}) / 10
        path = self.tmp_path / f"{model.slug}.jsonl"
        scores = dict.fromkeys(report.PAIRED, level)
        path.write_text("".join(json.dumps({"key": f"{c}/p{i}/{k}", "category": c, "scores": scores}) + "\n"
                                for c in report.CATEGORIES for i in range(2) for k in range(seeds)))
        return {"command": "toy", "seconds": 2.0, "metrics": metrics(level), "checkpoint": model.checkpoint,
                "root": str(self.tmp_path), "per_image": str(path)}


@pytest.fixture
def stand(tmp_path, monkeypatch):
    stand = Stand(tmp_path)
    for name in ("fit", "evaluate", "evaluate_toy"):
        monkeypatch.setattr(val_stopping, name, getattr(stand, name))
    return stand


def test_the_study_trains_first_then_scores_each_chosen_checkpoint_against_the_base(tmp_path, stand, capsys):
    arms = {}
    for name, best in (("A", 200), ("B", 100)):
        run = tmp_path / "runs" / name
        for step in (0, 100, 200, 300):  # the run went further than the budget: step 300 is not a candidate
            good = step in (best, 300)
            write_step(run, step, lambda c, i, good=good: float(i < (3 if good else 1)))
        folder = run / "logs" / "version_0" / "checkpoints"
        folder.mkdir(parents=True)
        for step in (100, 200):
            (folder / f"epoch=0-step={step}.ckpt").write_bytes(b"")
        arms[name] = harness.Model(name, (f"{name}.yaml",), str(run))
    out = tmp_path / "results" / "study"
    val_stopping.main(arms, "unused", 1000, "doc", "a_study", ["--out", str(out), "--max-steps", "200", "--seeds", "2",
                                                                "--full-per-category", "7", "--reevaluate"])
    fit_args = ["--config", harness.VAL_CONFIG, "--trainer.max_steps=200"]
    assert stand.fits == [("A", fit_args, False, 200), ("B", fit_args, False, 200)] * 2  # all training first
    assert stand.passes[:2] == [("Base", None, "validate", True), ("Base", None, "toy 7x2", True)]
    results = json.loads(out.with_suffix(".json").read_text())
    assert list(results["models"]) == ["Base", "A (step 200)", "B (step 100)"]
    assert results["study"] == "a_study"
    assert results["settings"] == {"max_steps": 200, "full_per_category": 7, "seeds": 2, "validation_seeds": 3,
                                   "training_seeds": [0]}
    a = results["models"]["A (step 200)"]
    assert a["arm"] == "A" and a["step"] == 200
    assert a["checkpoint"].endswith("version_0/checkpoints/epoch=0-step=200.ckpt")
    assert sorted(a["curve"], key=int) == ["0", "100", "200"] and a["fit"]["command"] == "t2i-align fit A"
    pairs = [(c["base"], c["method"]) for c in results["comparisons"]]
    assert pairs == [("Base", "A (step 200)"), ("Base", "B (step 100)")]
    assert results["comparisons"][0]["differences"]["all_clauses"]["difference"] == pytest.approx(0.1)
    text = out.with_suffix(".md").read_text()
    assert text == val_stopping.markdown(results) and text in capsys.readouterr().out
    assert "| A | 0.200 | 0.200 (+0.000 [+0.000, +0.000]) | 0.600 (+0.400 [" in text
    assert "50 validation prompts per category, 3 seeds)" in text
    assert (tmp_path / "results" / "study_grid.png").exists()


def test_training_seeds_train_each_arm_again_in_its_own_run(tmp_path, stand):
    run = tmp_path / "runs" / "A"
    for folder in (run, Path(f"{run}_seed1")):
        for step in (0, 100):
            write_step(folder, step, lambda c, i: float(i < 2))
        (folder / "logs" / "version_0" / "checkpoints").mkdir(parents=True)
        (folder / "logs" / "version_0" / "checkpoints" / "epoch=0-step=100.ckpt").write_bytes(b"")
    arms = {"A": harness.Model("A", ("A.yaml",), str(run))}
    out = tmp_path / "study"
    val_stopping.main(arms, "unused", 100, "doc", "a_study", ["--out", str(out), "--training-seeds", "0", "1",
                                                             "--full-per-category", "7", "--seeds", "2"])
    assert [name for name, *_ in stand.fits] == ["A", "A (training seed 1)"] * 2
    results = json.loads(out.with_suffix(".json").read_text())
    assert list(results["models"]) == ["Base", "A (step 100)", "A (training seed 1) (step 100)"]
    seeded = results["models"]["A (training seed 1) (step 100)"]
    assert "--model.init_args.seed=1" in seeded["overrides"] and seeded["checkpoint"].startswith(f"{run}_seed1/")
    assert results["settings"]["training_seeds"] == [0, 1]


def test_validation_only_reports_the_curves_and_generates_nothing_for_the_evaluation_prompts(tmp_path, stand):
    """Tuning a setting (CoMat's mixed-latent range and ratio): the arms are compared on validation only."""
    arms = {}
    for name, best in (("A", 100), ("B", 200)):
        run = tmp_path / "runs" / name
        for step in (0, 100, 200):
            write_step(run, step, lambda c, i, good=step == best: float(i < (3 if good else 1)))
        arms[name] = harness.Model(name, (f"{name}.yaml",), str(run))
    out = tmp_path / "tuning"
    val_stopping.main(arms, "unused", 200, "doc", "a_study", ["--out", str(out), "--validation-only"])
    assert stand.passes == []  # no evaluation pass at all, not even the base's
    assert [name for name, *_ in stand.fits] == ["A", "B", "A", "B"]
    results = json.loads(out.with_suffix(".json").read_text())
    assert {n: (m["arm"], m["step"], m["full_toy"]) for n, m in results["models"].items()} == {
        "A": ("A", 100, None), "B": ("B", 200, None)}
    assert results["settings"]["validation_only"] is True and results["comparisons"] == []
    text = out.with_suffix(".md").read_text()
    assert text == val_stopping.validation_markdown(results) and "| B | 0.200 | 0.200 (+0.000" in text
