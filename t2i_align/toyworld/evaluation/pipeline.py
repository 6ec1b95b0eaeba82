"""Evaluate a pipeline folder (optionally with a LoRA) on ToyWorld prompts (the command:
``python -m t2i_align.commands.toyworld_evaluate``)."""

from __future__ import annotations

import time


from t2i_align.common import image_grid
from t2i_align.diffusion.generator import Generator, GeneratorConfig
from t2i_align.diffusion.lora import load_lora
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.toyworld.evaluation.scoring import load_items, metric_keys, score_items, summarise
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.splits import EVAL_CATEGORIES


def evaluate_pipeline(pipeline: str, prompts_dir: str, lora: str | None = None, categories: list[str] | None = None,
                      per_category: int | None = None, images_per_prompt: int = 1, num_inference_steps: int = 25,
                      guidance_scale: float = 5.0, scheduler: str = "ddim", batch_size: int = 32, seed: int = 0,
                      grid_images: int = 32, device: str = "cpu") -> tuple[dict, object]:
    """Returns (report, grid image). The report holds the metrics, the sampler settings and the inputs."""
    generator = Generator(GeneratorConfig(pretrained=pipeline, lora=None))
    if lora:
        load_lora(generator.unet, lora)  # every weight of the export arrives, or this raises
    generator = generator.to(device).eval()
    categories = list(categories or EVAL_CATEGORIES)
    items = load_items(prompts_dir, categories, per_category, images_per_prompt, seed)
    keys = metric_keys(categories)
    sampling = SamplingSettings(num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler)
    start = time.time()
    sums, counts, kept = score_items(generator, items, ToyJudge(), keys, batch_size, keep_images=grid_images, sampling=sampling)
    report = {
        "metrics": summarise(keys, sums, counts),
        "images": len(items),
        "seconds": round(time.time() - start, 1),
        "sampling": sampling.as_dict(),
        "pipeline": pipeline,
        "lora": lora,
        "prompts_dir": prompts_dir,
        "per_category": per_category,
        "images_per_prompt": images_per_prompt,
        "seed": seed,
    }
    grid = image_grid([img for img, _, _ in kept]) if kept else None
    return report, grid
