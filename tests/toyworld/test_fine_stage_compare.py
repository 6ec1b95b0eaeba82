"""The fine-stage study's choices (experiments/toyworld/fine_stage_compare.py): the coarse-stage model is the arm with
the best validation score at its chosen step, and the fine stage keeps the generator settings of its stack (a whole-UNet
checkpoint loads into a whole-UNet FineStage). The passes themselves are compare_methods.py's, tested elsewhere."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.test_configs import config_args, parse_only


@pytest.fixture(scope="module")
def script():
    path = Path(REPO_ROOT) / "experiments" / "toyworld" / "fine_stage_compare.py"
    spec = importlib.util.spec_from_file_location("fine_stage_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_coarse_model_is_the_best_arm_on_validation_at_its_chosen_step(script, tmp_path):
    def arm(step, values, configs):
        return {"step": step, "configs": configs, "checkpoint": f"runs/{configs[-1]}/logs/version_0/x-step={step}.ckpt",
                "curve": {str(s): {"all_clauses": {"method": v}} for s, v in values.items()}}

    results = {"arms": {"A": arm(100, {0: 0.1, 100: 0.15, 200: 0.4}, ["a"]),  # 0.4 is not A's chosen step
                        "B": arm(200, {0: 0.1, 100: 0.12, 200: 0.2}, ["b"])}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    chosen = script.coarse_candidate(path)
    assert chosen["name"] == "B (step 200)" and chosen["validation_all_clauses"] == 0.2
    assert chosen["checkpoint"].endswith("step=200.ckpt")


def test_the_fine_stage_takes_the_generator_settings_of_the_checkpoint(script, tmp_path):
    import torch

    whole, lora = tmp_path / "whole.ckpt", tmp_path / "lora.ckpt"
    torch.save({"state_dict": {"generator.unet.conv_in.weight": torch.zeros(1)}}, whole)
    torch.save({"state_dict": {"generator.unet.x.lora_A.default.weight": torch.zeros(1)}}, lora)
    for ckpt, expected in ((whole, None), (lora, 4), (None, 4)):
        parsed = parse_only(config_args(*[c.removeprefix("configs/") for c in script.fine_configs(ckpt)]))
        assert parsed["model"]["class_path"].endswith("FineStage")
        settings = parsed["model"]["init_args"]["generator"]["lora"]
        assert (settings and settings["rank"]) == expected, ckpt
