"""Timing helpers shared by the benchmark scripts of this folder (each puts the folder on ``sys.path``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def peak_flops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured matmul FLOP/s (the best of a few timed n x n x n products)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        tic = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - tic) / 10)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Model sizes of the benchmarks: tiny ones for CPU smoke checks, full-size ones with random weights (the cost of
#: the real models; nothing downloaded) for GPU timing.
SIZES = ("tiny", "sd15", "tiny-sdxl", "sdxl")
FULL_SIZES = ("sd15", "sdxl")
XL_SIZES = ("tiny-sdxl", "sdxl")
#: What a folder of each size holds: the pipeline class (model_index.json) and the UNet's sample_size (its config)
_KINDS = {"tiny": ("StableDiffusionPipeline", 16), "sd15": ("StableDiffusionPipeline", 64),
          "tiny-sdxl": ("StableDiffusionXLPipeline", 16), "sdxl": ("StableDiffusionXLPipeline", 128)}


def pipeline_folder(model_dir, scratch, size: str):
    """The random-weight pipeline of ``size`` (one of :data:`SIZES`) a benchmark loads: ``model_dir`` when it
    already holds one (``model_index.json``; the GPU check builds it once for all its checks), else a new one
    written there or under ``scratch``. A folder that holds another size's pipeline is refused (it would time the
    wrong model)."""
    from t2i_align.diffusion import tiny

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: one of {SIZES}")
    folder = Path(model_dir) if model_dir else Path(scratch) / "sd"
    if (folder / "model_index.json").exists():
        kind = json.loads((folder / "model_index.json").read_text()).get("_class_name")
        unet = folder / "unet" / "config.json"
        sample_size = json.loads(unet.read_text()).get("sample_size") if unet.exists() else None
        if (kind, sample_size) != _KINDS[size]:
            raise ValueError(f"{folder} holds a {kind} with UNet sample_size {sample_size}, not the {size} pipeline "
                             f"({_KINDS[size][0]}, sample_size {_KINDS[size][1]}): give another --model-dir")
        return folder
    build = {"tiny": tiny.save_tiny_pipeline, "sd15": tiny.save_random_sd15,
             "tiny-sdxl": tiny.save_tiny_sdxl_pipeline, "sdxl": tiny.save_random_sdxl}[size]
    return build(folder)
