"""``python -m t2i_align.toyworld.evaluation.pipeline PIPELINE --lora DIR`` scores the model that was trained: with the ToyWorld
CoMat overlay's wide LoRA (attention, projections, feed-forward, ResNet convolutions) it draws the module's images."""

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from t2i_align.commands.toyworld_evaluate import main
from t2i_align.common import image_grid
from t2i_align.diffusion.generator import Generator, GeneratorConfig, LoraSettings
from t2i_align.diffusion.lora import export_trained_weights
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.toyworld.evaluation.scoring import load_items
from t2i_align.toyworld.splits import eval_prompt_sets, write_prompts
from tests.helpers import REPO_ROOT

PIPELINE = str(Path(REPO_ROOT) / "models" / "toyworld" / "pipeline")
COMAT = Path(REPO_ROOT) / "configs" / "experiment" / "toyworld_comat.yaml"
STEPS, GUIDANCE = 3, 5.0  # evaluate's default guidance; few steps keep the test in seconds


def grid_of(generator: Generator, items) -> np.ndarray:
    with torch.no_grad():
        images = generator.sample([it.prompt for it in items], [it.seed for it in items],
                                  SamplingSettings(STEPS, guidance_scale=GUIDANCE, scheduler="ddim")).images
    return np.asarray(image_grid(list(images)), dtype=int)


def test_evaluate_with_lora_draws_the_trained_models_images(tmp_path):
    targets = yaml.safe_load(COMAT.read_text())["model"]["init_args"]["generator"]["lora"]["target_modules"]
    gen = Generator(GeneratorConfig(pretrained=PIPELINE, lora=LoraSettings(rank=4, target_modules=targets)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gen.trainable_parameters():  # B = 0 at init: give every adapter weights, as training would
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    lora = export_trained_weights(gen, tmp_path / "lora").parent
    prompts = tmp_path / "prompts"
    for category, specs in eval_prompt_sets(0, 2).items():
        write_prompts(specs, prompts / f"{category}.txt")

    main([PIPELINE, "--prompts", str(prompts), "--lora", str(lora), "--categories", "color_binding", "counting",
          "--per-category", "2", "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--device", "cpu",
          "--out", str(tmp_path / "report.json"), "--grid", str(tmp_path / "grid.png")])

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["lora"] == str(lora) and report["images"] == 4
    items = load_items(prompts, ["color_binding", "counting"], per_category=2)
    theirs = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"), dtype=int)
    ours = grid_of(gen, items)
    base = grid_of(Generator(GeneratorConfig(pretrained=PIPELINE, lora=None)), items)
    # The grid stores 8-bit pixels: images within 1e-4 of ours (tests/diffusion/test_lora_export.py) may round one
    # level apart, no more; the LoRA itself moves them far more than that.
    assert np.abs(base - ours).max() > 20
    off = np.abs(theirs - ours).max()
    assert off <= 1, f"evaluate --lora drew pixels up to {off} levels away from the trained module's"
