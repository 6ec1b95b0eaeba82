"""Time one ReFL training step (sampling to the grad step, one grad UNet call, decode, reward, L_pre, backward,
optimizer step) and report seconds per step, peak memory and the achieved fraction of the device's peak FLOP
rate (measured here with a large matmul in the training dtype).

    python experiments/benchmarks/refl_step.py --size sd15 --device cuda --batch 4   # GPU: SD1.5 size, 512 px
    python experiments/benchmarks/refl_step.py --size sdxl --device cuda             # GPU: SDXL size, 1024 px
    python experiments/benchmarks/refl_step.py                                         # CPU smoke check, tiny model
    python experiments/benchmarks/refl_step.py --size tiny-sdxl                        # CPU smoke check, tiny SDXL

SD1.5-size models are built with random weights (same cost as the real ones; no network needed); the reward
is a CLIP ViT-L/14-size CLIPReward. Batch per device, resolution and step window follow configs/method/refl.yaml
unless overridden.

SDXL size (``--size sdxl``): the SDXL-base pipeline of ``save_random_sdxl`` (2.6 B UNet; written once, ~7 GB in
float16, into ``--model-dir`` or a temporary folder), the same CLIP ViT-L/14-size reward, 1024 px (SDXL's own
resolution: sampling and the L_pre pairs), the whole UNet trained (``--lora-rank 0``, as at SD1.5 size) and gradient
checkpointing on (as configs/model/sdxl.yaml; ``--no-gradient-checkpointing`` turns it off). Batch 4 is our choice:
the SD1.5 benchmark's batch per device; neither ImageReward nor RealignDiff trains on SDXL, so no paper gives one.
``--size tiny-sdxl``: the tiny SDXL pipeline (``save_tiny_sdxl_pipeline``), for CPU smoke checks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import FULL_SIZES, SIZES, XL_SIZES, peak_flops, pipeline_folder, sync


def save_reward_clip(folder: Path, size: str) -> str:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    from t2i_align.diffusion.assets import TINY_TOKENIZER_DIR
    from t2i_align.toyworld.experts.clip_model import image_processor

    tokenizer = CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    if size in FULL_SIZES:  # ViT-L/14 at 224 px
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        vision = dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16)
        projection, pixels = 768, 224
    else:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2)
        projection, pixels = 16, 32
    text.update(vocab_size=49408, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)).save_pretrained(folder)
    processor = image_processor()
    processor.size, processor.crop_size = {"shortest_edge": pixels}, {"height": pixels, "width": pixels}
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the size's defaults filled in where an option was not given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=None,
                   help="prompts (and pairs) per step (default 4 sd15 and sdxl, 2 tiny)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 sd15, 1024 sdxl, 32 tiny")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="frozen weights / autocast")
    p.add_argument("--lora-rank", type=int, default=0, help="0: full UNet (ImageReward / RealignDiff)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on at the SDXL sizes, off otherwise")
    p.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    p.add_argument("--num-inference-steps", type=int, default=40)
    p.add_argument("--min-step", type=int, default=30)
    p.add_argument("--max-step", type=int, default=39)
    p.add_argument("--out", type=Path, help="write the numbers as JSON")
    p.add_argument("--model-dir", help="load the random pipeline from this folder (written there first if empty)")
    a = p.parse_args(argv)
    if a.batch is None:
        a.batch = 4 if a.size in FULL_SIZES else 2
    if a.resolution is None:
        a.resolution = {"sd15": 512, "sdxl": 1024}.get(a.size, 32)
    if a.gradient_checkpointing is None:  # as configs/model/sdxl.yaml
        a.gradient_checkpointing = a.size in XL_SIZES
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)

    from t2i_align.diffusion.generator import GeneratorConfig, LoraSettings
    from t2i_align.diffusion.sampling import SamplingSettings
    from t2i_align.lightning_modules.refl import ReFL
    from t2i_align.rewards import CLIPReward

    batch, resolution, checkpointing, xl = a.batch, a.resolution, a.gradient_checkpointing, a.size in XL_SIZES
    dtype_name = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        folder = pipeline_folder(a.model_dir, tmp, a.size)
        reward = CLIPReward(save_reward_clip(Path(tmp) / "clip", a.size))
        lora = LoraSettings(rank=a.lora_rank) if a.lora_rank else None
        config = GeneratorConfig(pretrained=str(folder), lora=lora, weight_dtype=dtype_name,
                                 gradient_checkpointing=checkpointing)
        sampling = SamplingSettings(num_inference_steps=a.num_inference_steps, guidance_scale=1.0, scheduler="ddpm",
                                    resolution=resolution)
        module = ReFL(generator=config, reward=reward, sampling=sampling, min_step=a.min_step,
                      max_step=a.max_step).to(device)
        module.experts.to(device)  # the reward is not a child of the module: what on_fit_start does under Lightning
        print(f"built and loaded in {time.perf_counter() - tic:.0f} s", flush=True)
    optimizer = torch.optim.AdamW(module.generator.trainable_parameters(), lr=1e-5)
    prompts = [f"a photo of {n} red circles next to a blue square" for n in range(batch)]
    pixels = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)).to(device)

    def step(k: int) -> None:
        gen = torch.Generator().manual_seed(k)
        loss, _, _ = module.refl_loss(prompts, gen)
        loss = loss + module.generator.denoising_loss(pixels, prompts, gen)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for k in range(2):
        step(k)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for k in range(a.steps):
        sync(device)
        tic = time.perf_counter()
        step(100 + k)
        sync(device)
        times.append(time.perf_counter() - tic)
    with FlopCounterMode(display=False) as counter:
        step(1000)  # the grad step m is drawn from the same window: FLOPs are of a typical step
    flops = counter.get_total_flops()
    seconds = statistics.median(times)
    peak = peak_flops(device, getattr(torch, dtype_name), 8192 if device.type == "cuda" else 1024)
    result = {
        "size": a.size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": batch, "resolution": resolution, "dtype": dtype_name, "lora_rank": a.lora_rank,
        "gradient_checkpointing": checkpointing, "num_inference_steps": a.num_inference_steps, "sdxl": xl,
        "sec_per_step": seconds, "sec_per_step_all": times,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "tflop_per_step": flops / 1e12, "achieved_tflops": flops / seconds / 1e12, "peak_tflops_measured": peak / 1e12,
        "fraction_of_peak": flops / seconds / peak,
    }
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
