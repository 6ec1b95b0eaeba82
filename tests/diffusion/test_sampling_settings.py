"""One sampler settings type: validated, configured as one group everywhere, and every field reaches the sampler."""

from pathlib import Path

import pytest
import torch
import yaml

from t2i_align.cli import main as cli_main
from t2i_align.common import ConfigError
from t2i_align.diffusion.generator import Generator, GeneratorConfig
from t2i_align.diffusion.sampling import SamplingSettings
from tests.helpers import REPO_ROOT

CONFIGS = Path(REPO_ROOT) / "configs"


@pytest.mark.parametrize("field, value", [("num_inference_steps", 0), ("num_inference_steps", 2.5),
                                          ("scheduler", "euler"), ("eta", 1.5), ("resolution", 0)])
def test_a_bad_value_is_refused_naming_its_key(field, value):
    with pytest.raises(ConfigError, match=rf"sampling\.{field}"):
        SamplingSettings(**{field: value})


def test_eta_and_resolution_reach_the_sampler(tiny_sd):
    gen = Generator(GeneratorConfig(tiny_sd))
    base = SamplingSettings(4, guidance_scale=1.0, scheduler="ddim")
    with torch.no_grad():
        deterministic = gen.sample(["a red circle"], [0], base, decode=False).latents
        again = gen.sample(["a red circle"], [0], base, decode=False).latents
        noisy = gen.sample(["a red circle"], [0], base.replace(eta=1.0), decode=False).latents
        small = gen.sample(["a red circle"], [0], base.replace(resolution=16), decode=False).latents
    assert torch.equal(deterministic, again)
    assert (noisy - deterministic).abs().max() > 1e-3  # DDIM's eta adds the seeded step noise
    factor = gen.vae_scale_factor
    assert deterministic.shape[-1] == gen.default_resolution // factor and small.shape[-1] == 16 // factor
    with pytest.raises(ConfigError, match=f"sampling.resolution={16 + 1}"):
        gen.sample(["a red circle"], [0], base.replace(resolution=16 + 1))


def print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


def test_a_config_that_sets_one_key_keeps_the_owners_defaults_for_the_others(capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    stack = ["--config", str(CONFIGS / "method/refl.yaml"), "--config", str(CONFIGS / "experiment/toyworld.yaml"),
             "--config", str(CONFIGS / "experiment/toyworld_refl_caption.yaml")]
    config = print_config([*stack, "--model.init_args.sampling.eta=0.5"], capsys)
    # the overlay sets 20 steps, the method config DDPM without CFG, the command line eta
    assert config["model"]["init_args"]["sampling"] == {"num_inference_steps": 20, "guidance_scale": 1.0,
                                                        "scheduler": "ddpm", "eta": 0.5, "resolution": None}
    [toy] = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ToyWorldEvaluation")]
    assert toy["init_args"]["sampling"] == {"num_inference_steps": 25, "guidance_scale": 5.0, "scheduler": "ddim",
                                            "eta": 0.0, "resolution": None}
