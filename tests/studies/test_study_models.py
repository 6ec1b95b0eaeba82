"""Every model a study declares: its stack is the one its last file's header gives, parses, and trains into the run
folder the study reads (its own: no two share one); the base and the full pass build on the real configs."""

import json
from pathlib import Path

import pytest

from t2i_align.studies import comat_ablation, compare_methods, fine_stage_compare, harness, tokencompose_compare
from tests.test_configs import config_args, header_stack, parse_only

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
TRAINED = {"compare_methods": compare_methods.METHODS, "comat_ablation": comat_ablation.ARMS,
           "tokencompose_compare": tokencompose_compare.ARMS}


@pytest.mark.parametrize("study", list(TRAINED))
def test_studies_train_the_overlays_stacks_in_their_own_folders(study):
    folders = set()
    for name, model in TRAINED[study].items():
        assert model.name == name and model.checkpoint is None
        relative = [c.removeprefix("configs/") for c in model.configs]
        assert relative == header_stack(relative[-1]), name
        trainer = parse_only(config_args(*relative))["trainer"]
        assert trainer["default_root_dir"] == trainer["logger"]["init_args"]["save_dir"] == model.run_dir, name
        folders.add(model.run_dir)
    assert len(folders) == len(TRAINED[study])  # no two runs share a folder


def test_the_base_is_finetunes_stack_without_a_checkpoint():
    assert harness.BASE.configs == compare_methods.METHODS["Finetune"].configs
    assert harness.BASE.checkpoint is None and harness.BASE.run_dir is None
    assert [c.removeprefix("configs/") for c in harness.BASE.configs] == header_stack("experiment/toyworld.yaml")
    assert fine_stage_compare.FINE[-1].removeprefix("configs/") == "experiment/toyworld_fine_stage.yaml"
    fine = [c.removeprefix("configs/") for c in fine_stage_compare.FINE]
    assert fine == header_stack("experiment/toyworld_fine_stage.yaml")


def test_the_real_passes_resolve_on_the_base(monkeypatch):
    """The key of the base's two passes as the studies ask for them (configs/eval/toyworld.yaml as it is now)."""
    base = [*harness.config_args(harness.BASE.configs), "--config", harness.EVAL_CONFIG, "--trainer.logger=false"]
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the studies run from the repository root
    every = harness.evaluation_key(base, None)["config"]["trainer"]["callbacks"]
    assert len(every) >= 4 and every[0]["class_path"].endswith("ToyWorldEvaluation")
    full = harness.toy_pass_callbacks(100, 3)
    key = harness.evaluation_key([*base, "--trainer.callbacks=" + json.dumps(full)], None)
    [toy] = key["config"]["trainer"]["callbacks"]
    assert toy["init_args"]["per_category"] == 100 and toy["init_args"]["images_per_prompt"] == 3
    # the full pass differs from the eval config's toy evaluation only where toy_pass_callbacks says so
    changed = {"per_category", "images_per_prompt", "per_image", "log_samples"}
    assert {k: v for k, v in toy["init_args"].items() if k not in changed} == \
        {k: v for k, v in every[0]["init_args"].items() if k not in changed}
