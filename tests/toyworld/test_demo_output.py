"""The ToyWorld before/after summary printed when a fit ends (the README demo's output): short, with paired
intervals from the per-image records of the two passes, and the full numbers in toy_eval.json."""

import json

import lightning as L
import pytest
import torch

from t2i_align.callbacks.toyworld import (
    HEADLINE,
    ToyWorldEvaluation,
    comparison_table,
    evaluation_size,
    paired_differences,
)
from t2i_align.common import EvalItem
from t2i_align.toyworld.evaluation.scoring import accumulate, metric_keys, summarise
from t2i_align.toyworld.splits import EVAL_CATEGORIES, eval_prompt_sets, write_prompts
from tests.helpers import RenderingModule

SAMPLING = {"num_inference_steps": 25, "guidance_scale": 5.0, "scheduler": "ddim", "eta": 0.0, "resolution": None}
KEYS = metric_keys(EVAL_CATEGORIES)


def records(ok: list[float], prompts: int = 16, images: int = 1) -> list[dict]:
    """Per-image records of every category: image ``i`` of the run has ``all_clauses = ok[i % len(ok)]`` (and the
    other headline metrics follow from it)."""
    out, i = [], 0
    for category in EVAL_CATEGORIES:
        for p in range(prompts):
            for k in range(images):
                v = ok[i % len(ok)]
                i += 1
                out.append({"key": f"{category}/{p}/{k}", "category": category,
                            "scores": {"all_clauses": v, "object_accuracy": v, "object_missing": 1 - v,
                                       "attribute_wrong": 0.0, "tifa": v}})
    return out


def records_metrics(recs: list[dict]) -> dict[str, float]:
    """The metrics of per-image records, as the callback logs them."""
    sums, counts = torch.zeros(len(KEYS), dtype=torch.float64), torch.zeros(len(KEYS), dtype=torch.float64)
    accumulate(sums, counts, KEYS, [EvalItem(r["key"], "p", 0, r["category"]) for r in recs], [r["scores"] for r in recs])
    return summarise(KEYS, sums, counts)


def test_identical_passes_give_an_interval_around_zero():
    before = records([0.0, 1.0, 0.0, 0.0, 1.0])
    for metric, d in paired_differences(before, before).items():
        assert d.difference == 0 and d.low <= 0 <= d.high, metric


def test_a_clearly_better_after_excludes_zero_and_a_noisy_one_does_not():
    before = records([0.0, 0.0, 0.0, 1.0])  # 25 % right
    better = records([1.0, 1.0, 0.0, 1.0])  # 75 % right, the same images that were right stay right
    d = paired_differences(before, better)["all_clauses"]
    assert d.difference == pytest.approx(0.5) and d.low > 0
    assert paired_differences(before, better)["object_missing"].high < 0
    # one image of 112 flipped: a change, but not beyond noise
    flipped = [dict(r, scores={**r["scores"], "all_clauses": 1.0}) if i == 0 else r for i, r in enumerate(before)]
    d = paired_differences(before, flipped)["all_clauses"]
    assert d.difference > 0 and d.low <= 0 <= d.high


def test_the_summary_is_short_and_says_what_it_can_tell():
    before, after = records([0.0, 0.0, 0.0, 1.0]), records([1.0, 1.0, 0.0, 1.0])
    b, a = records_metrics(before), records_metrics(after)
    items = [EvalItem(r["key"], "p", 0, r["category"]) for r in before]
    text = comparison_table(b, a, evaluation_size(items), SAMPLING, paired_differences(before, after), "x/toy_eval.json")
    lines = text.splitlines()
    assert len(lines) <= 9 and not any("color_binding" in line for line in lines)  # categories go to the JSON
    assert "7 categories x 16 prompts x 1 image per prompt" in lines[0] and "25 ddim steps, CFG 5.0" in lines[0]
    row = next(line for line in lines if line.split()[0] == "all_clauses")
    assert row.split()[1:4] == ["0.250", "0.750", "+0.500"] and "[+" in row  # interval above 0
    assert [line.split()[0] for line in lines[2:6]] == list(HEADLINE)
    assert "smoke check" in text and "x/toy_eval.json" in lines[-1]
    # without records: the change alone, said to be without interval, with the size of one image's effect
    plain = comparison_table(b, a, evaluation_size(items), SAMPLING)
    assert "[" not in plain.splitlines()[2] and "No interval" in plain and "0.062" in plain
    # a full-size evaluation (100 prompts per category) is not called a smoke check
    assert "smoke" not in comparison_table(b, a, (7, 100, 3), SAMPLING)


def test_evaluation_size_counts_prompts_and_images():
    items = [EvalItem(r["key"], "p", 0, r["category"]) for r in records([1.0], prompts=5, images=3)]
    assert evaluation_size(items) == (7, 5, 3)
    assert evaluation_size(items[:-1]) == (7, 5, 2)  # the smallest, never an average


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    for category, specs in eval_prompt_sets(0, 6).items():
        write_prompts(specs, root / f"{category}.txt")
    return root


class LearnsToBind(RenderingModule):
    """Binds colours wrongly until its first training step, then renders prompts exactly."""

    def __init__(self):
        super().__init__(swap_colours=True)

    def training_step(self, batch, batch_idx):
        self.generator.swap_colours = False
        return self.layer(batch.float().view(-1, 1)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(prompts_dir, root, per_image: bool, caplog) -> tuple[dict, str]:
    callback = ToyWorldEvaluation(str(prompts_dir), categories=["color_binding", "spatial"], per_category=6,
                                  log_samples=0, evaluate_before_fit=True, per_image=per_image)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=root, max_steps=2,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader([0, 1])
    with caplog.at_level("INFO"):
        trainer.fit(LearnsToBind(), train_dataloaders=loader, val_dataloaders=loader)
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("ToyWorld, before -> after"))
    return json.loads((root / "toy_eval.json").read_text()), summary


def test_fit_prints_the_summary_with_intervals_and_keeps_every_number(prompts_dir, tmp_path, caplog):
    report, summary = fit(prompts_dir, tmp_path, per_image=True, caplog=caplog)
    # the report keeps its keys (other code reads them) and every per-category number
    assert {"before", "after", "step", "images", "sampling"} <= set(report) and report["step"] == 2
    assert report["before"]["color_binding/all_clauses"] < 0.5 and report["after"]["color_binding/all_clauses"] == 1.0
    paired = report["paired"]["all_clauses"]
    assert paired["difference"] == pytest.approx(report["after"]["all_clauses"] - report["before"]["all_clauses"])
    assert paired["low"] > 0 and paired["prompts"] == 12  # colour binding fixed: clearly better, paired by prompt
    lines = summary.splitlines()
    assert len(lines) <= 9 and "2 categories x 6 prompts x 1 image" in lines[0]
    row = next(line for line in lines if line.split()[0] == "all_clauses")
    assert row.split()[3] == f"{paired['difference']:+.3f}" and row.split()[4] == f"[{paired['low']:+.3f},"
    assert "smoke check" in summary and str(tmp_path / "toy_eval.json") in summary


def test_the_intervals_come_from_this_fits_own_passes_not_from_files(prompts_dir, tmp_path, caplog):
    stale = tmp_path / "toy_eval" / "per_image_step_0.jsonl"  # an earlier run's records in the same folder
    stale.parent.mkdir(parents=True)
    stale.write_text("".join(json.dumps(r) + "\n" for r in records([1.0])))
    report, summary = fit(prompts_dir, tmp_path, per_image=False, caplog=caplog)
    assert report["paired"]["all_clauses"]["low"] > 0 and report["paired"]["all_clauses"]["prompts"] == 12
    assert "[" in summary and "No interval" not in summary
    assert sorted(p.name for p in stale.parent.iterdir()) == [stale.name]  # per_image: false writes no records
