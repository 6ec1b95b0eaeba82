"""Evaluate a pipeline folder (optionally with a LoRA) on ToyWorld prompts:
``python -m t2i_align.commands.toyworld_evaluate PIPELINE --prompts DIR [--lora DIR] --out report.json --grid grid.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from t2i_align.io import atomic_path
from t2i_align.toyworld.evaluation.pipeline import evaluate_pipeline


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
