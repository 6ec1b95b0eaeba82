"""The validation-stopping comparison's bookkeeping (experiments/toyworld/val_stopping.py): the learning curve from
the validation records, the choice of the stopping step (validation only, a trained step), and which checkpoint it
evaluates. The training and the evaluation passes are the CLI's and compare_methods.py's, tested elsewhere."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

CATEGORIES = ("color_binding", "shape")


@pytest.fixture(scope="module")
def script():
    path = Path(REPO_ROOT) / "experiments" / "toyworld" / "val_stopping.py"
    spec = importlib.util.spec_from_file_location("val_stopping", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_step(run_dir: Path, step: int, value_of) -> None:
    """Validation records of ``step``: all_clauses = value_of(category, prompt index), 5 prompts x 1 seed."""
    folder = run_dir / "toy_eval"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"key": f"{c}/p{i}/0", "category": c,
                         "scores": {"all_clauses": value_of(c, i), "object_missing": 0.0, "attribute_wrong": 0.0}})
             for c in CATEGORIES for i in range(5)]
    (folder / f"per_image_step_{step}.jsonl").write_text("\n".join(lines) + "\n")


def test_learning_curve_is_paired_against_step_zero(script, tmp_path):
    write_step(tmp_path, 0, lambda c, i: float(i < 1))  # 0.2 in both categories
    write_step(tmp_path, 100, lambda c, i: float(i < 3) if c == "color_binding" else float(i < 1))  # +0.4 in one
    write_step(tmp_path, 200, lambda c, i: 0.0)
    curve = script.learning_curve(tmp_path)
    assert sorted(curve) == [0, 100, 200]
    assert curve[0]["all_clauses"]["difference"] == 0
    assert curve[100]["all_clauses"]["method"] == pytest.approx(0.4)
    assert curve[100]["all_clauses"]["difference"] == pytest.approx(0.2)
    assert curve[200]["all_clauses"]["difference"] == pytest.approx(-0.2) and curve[200]["all_clauses"]["low"] < 0
    assert script.choose_step(curve) == 100


def test_curve_needs_the_step_zero_records(script, tmp_path):
    write_step(tmp_path, 100, lambda c, i: 0.0)
    with pytest.raises(FileNotFoundError, match="per_image_step_0"):
        script.learning_curve(tmp_path)


def point(value: float) -> dict:
    return {"all_clauses": {"method": value}}


def test_stopping_step_is_a_trained_step_earliest_on_ties(script):
    assert script.choose_step({0: point(0.9), 100: point(0.1), 200: point(0.2)}) == 200  # never the base itself
    assert script.choose_step({0: point(0.1), 100: point(0.3), 200: point(0.3), 300: point(0.2)}) == 100
    with pytest.raises(ValueError, match="val_check_interval"):
        script.choose_step({0: point(0.1)})


def test_checkpoint_of_the_step_from_the_newest_version(script, tmp_path):
    with pytest.raises(FileNotFoundError, match="step 100"):
        script.checkpoint_at(tmp_path, 100)
    for version in (1, 10):
        folder = tmp_path / "logs" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        for step in (100, 200):
            (folder / f"epoch=0-step={step}.ckpt").write_bytes(b"")
    (tmp_path / "logs" / "version_10" / "checkpoints" / "epoch=0-step=1000.ckpt").write_bytes(b"")
    found = script.checkpoint_at(tmp_path, 100)
    assert found.parts[-3] == "version_10" and found.name == "epoch=0-step=100.ckpt"  # not step=1000
