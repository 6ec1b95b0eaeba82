"""Evaluate a pipeline folder (optionally with a LoRA) on ToyWorld prompts:
``python -m t2i_align.toyworld.evaluate PIPELINE --prompts DIR [--lora DIR] --out report.json --grid grid.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from t2i_align.common import image_grid
from t2i_align.diffusion.generator import Generator, GeneratorConfig
from t2i_align.diffusion.lora import load_lora
from t2i_align.io import atomic_path
from t2i_align.toyworld.evaluation import load_items, metric_keys, score_items, summarise
from t2i_align.toyworld.judge import ToyJudge
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
    sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler)
    start = time.time()
    sums, counts, kept = score_items(generator, items, ToyJudge(), keys, batch_size, keep_images=grid_images, **sampling)
    report = {
        "metrics": summarise(keys, sums, counts),
        "images": len(items),
        "seconds": round(time.time() - start, 1),
        "sampling": sampling,
        "pipeline": pipeline,
        "lora": lora,
        "prompts_dir": prompts_dir,
        "per_category": per_category,
        "images_per_prompt": images_per_prompt,
        "seed": seed,
    }
    grid = image_grid([img for img, _, _ in kept]) if kept else None
    return report, grid


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("pipeline", help="diffusers SD folder (e.g. the ToyWorld base pipeline)")
    p.add_argument("--prompts", required=True, help="folder of <category>.txt files (toyworld build: prompts/eval)")
    p.add_argument("--lora", help="folder with pytorch_lora_weights.safetensors")
    p.add_argument("--categories", nargs="*")
    p.add_argument("--per-category", type=int)
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, required=True, help="JSON report")
    p.add_argument("--grid", type=Path, help="PNG grid of the first images")
    a = p.parse_args(argv)
    report, grid = evaluate_pipeline(a.pipeline, a.prompts, a.lora, a.categories, a.per_category, a.images_per_prompt,
                                     a.steps, a.guidance, a.scheduler, a.batch_size, a.seed, device=a.device)
    with atomic_path(a.out) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    if a.grid and grid is not None:
        with atomic_path(a.grid) as tmp:
            grid.save(tmp, format="PNG")
    for key, value in report["metrics"].items():
        print(f"{key:32s} {value:.3f}")


if __name__ == "__main__":
    main()
