"""The exported LoRA loads into a plain diffusers pipeline and reproduces our sampler's image."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors import safe_open

from t2i_align.diffusion.generator import Generator, GeneratorConfig, LoraSettings
from t2i_align.diffusion.lora import LORA_WEIGHT_NAME, export_lora


def test_export_loads_in_diffusers_and_reproduces_the_image(tiny_sd, tmp_path):
    gen = Generator(GeneratorConfig(pretrained=tiny_sd, lora=LoraSettings(rank=4, alpha=8)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = export_lora(gen, tmp_path / "lora")
    assert path.name == LORA_WEIGHT_NAME and path.exists()
    assert [p.name for p in (tmp_path).iterdir()] == ["lora"]  # no temporary left behind

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert all(k.startswith("unet.") and "lora" in k for k in f.keys())
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8  # diffusers flattens "unet." + key

    prompts, seeds = ["a red circle", "two blue squares"], [5, 6]
    with torch.no_grad():
        ours = gen.sample(prompts, seeds, num_inference_steps=5, guidance_scale=7.5, scheduler="ddim").images

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def run():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(prompts, num_inference_steps=5, guidance_scale=7.5, generator=gens, output_type="pt").images

    base = run()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    theirs = run()
    assert not torch.allclose(base, theirs, atol=1e-3)  # the LoRA matters
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_export_refuses_full_finetuning(tiny_sd, tmp_path):
    gen = Generator(GeneratorConfig(pretrained=tiny_sd, lora=None))
    with pytest.raises(ValueError, match="LoRA"):
        export_lora(gen, tmp_path / "x")
    assert not (tmp_path / "x").exists()
