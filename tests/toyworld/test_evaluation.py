"""ToyWorld evaluation: scoring, per-category summaries, the Lightning callback and the grid."""

import json

import lightning as L
import pytest
import torch

from t2i_align.callbacks.toyworld import ToyWorldEvaluation
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.toyworld.evaluation.scoring import load_items, metric_keys, score_items, summarise
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.splits import eval_prompt_sets, write_prompts
from tests.helpers import RenderingGenerator, RenderingModule


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    for category, specs in eval_prompt_sets(0, 6).items():
        write_prompts(specs, root / f"{category}.txt")
    return root


def test_items_have_fixed_distinct_seeds(prompts_dir):
    items = load_items(prompts_dir, per_category=3, images_per_prompt=2)
    assert len(items) == 7 * 3 * 2
    assert items == load_items(prompts_dir, per_category=3, images_per_prompt=2)
    assert len({it.seed for it in items}) == len(items)


def test_perfect_renders_score_one_and_swapped_colours_fail(prompts_dir):
    items = load_items(prompts_dir, categories=["color_binding", "spatial", "counting"], per_category=6)
    keys = metric_keys(["color_binding", "spatial", "counting"])
    judge = ToyJudge()
    good = summarise(keys, *score_items(RenderingGenerator(), items, judge, keys, batch_size=4)[:2])
    assert good["all_clauses"] == 1.0 and good["tifa"] == 1.0 and good["object_accuracy"] == 1.0
    bad = summarise(keys, *score_items(RenderingGenerator(swap_colours=True), items, judge, keys, batch_size=4)[:2])
    assert bad["color_binding/all_clauses"] < 0.5 and bad["spatial/all_clauses"] < 1.0
    assert {"color_binding/tifa", "counting/mg2"} <= set(good)


def test_callback_logs_toy_metrics_and_a_grid(prompts_dir, tmp_path):
    def Module():
        return RenderingModule()

    callback = ToyWorldEvaluation(str(prompts_dir), per_category=2, batch_size=5, log_samples=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    module = Module()
    trainer.validate(module, dataloaders=torch.utils.data.DataLoader([0]))
    metrics = trainer.callback_metrics
    assert metrics["val/toy/all_clauses"] == 1.0 and metrics["val/toy/multi_object/mg4"] == 1.0
    prompts_seen = [p for call in module.generator.calls for p in call[0]]
    assert len(prompts_seen) == 14 and len(set(zip(prompts_seen, [s for c in module.generator.calls for s in c[1]]))) == 14
    assert module.generator.calls[0][2] == SamplingSettings(25, guidance_scale=5.0, scheduler="ddim")
    assert (tmp_path / "samples" / "toy" / "step_0.png").exists()


def test_callback_writes_every_image_with_its_clauses(prompts_dir, tmp_path):
    def Module():
        return RenderingModule(swap_colours=True)

    callback = ToyWorldEvaluation(str(prompts_dir), categories=["color_binding", "counting"], per_category=3,
                                  images_per_prompt=2, batch_size=4, log_samples=0, per_image=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(Module(), dataloaders=torch.utils.data.DataLoader([0]))
    lines = (tmp_path / "toy_eval" / "per_image_step_0.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["key"] for r in records] == [it.key for it in callback.items]  # every image once, in item order
    assert {r["category"] for r in records} == {"color_binding", "counting"} and len({r["seed"] for r in records}) == 12
    binding = [r for r in records if r["category"] == "color_binding"]
    # swapped colours: both shapes drawn, each in the other's colour
    assert all(r["scores"]["all_clauses"] == 0 and r["scores"]["attribute_wrong"] == 1 for r in binding)
    assert all([c["verdict"] for c in r["clauses"]] == ["wrong_attribute", "wrong_attribute"] for r in binding)
    mean = sum(r["scores"]["all_clauses"] for r in records) / len(records)
    assert mean == pytest.approx((callback.after or {}).get("all_clauses", mean))


def test_callback_compares_before_and_after_fit(prompts_dir, tmp_path, caplog):
    class Module(RenderingModule):
        """Binds colours wrongly until its first training step, then renders prompts exactly."""

        def __init__(self):
            super().__init__(swap_colours=True)
            self.dropout = torch.nn.Dropout(0.5)
            self.modes_while_training = []

        def training_step(self, batch, batch_idx):
            self.generator.swap_colours = False
            self.modes_while_training.append(self.dropout.training)
            return self.layer(batch.float().view(-1, 1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = ToyWorldEvaluation(str(prompts_dir), categories=["color_binding", "spatial"], per_category=4,
                                  log_samples=0, evaluate_before_fit=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path, max_steps=2,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0)
    module = Module()
    loader = torch.utils.data.DataLoader([0, 1])
    with caplog.at_level("INFO"):
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    report = json.loads((tmp_path / "toy_eval.json").read_text())
    assert report["before"]["color_binding/all_clauses"] < 0.5
    assert report["after"]["color_binding/all_clauses"] == 1.0 and report["step"] == 2
    assert module.modes_while_training == [True, True]  # evaluation left training mode as it found it
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("ToyWorld, before -> after"))
    row = next(line for line in summary.splitlines() if line.split()[0] == "all_clauses")
    assert row.split()[1:4] == [f"{report['before']['all_clauses']:.3f}", "1.000",
                                f"{1 - report['before']['all_clauses']:+.3f}"]
