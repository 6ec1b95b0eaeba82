"""Timing helpers shared by the benchmark scripts of this folder (each puts the folder on ``sys.path``)."""

from __future__ import annotations

import time

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


def pipeline_folder(model_dir, scratch, sd15: bool):
    """The random-weight pipeline a benchmark loads: ``model_dir`` when it already holds one (``model_index.json``;
    the GPU check builds SD1.5 once for all its checks), else a new one written there or under ``scratch``."""
    from pathlib import Path

    from t2i_align.diffusion.tiny import save_random_sd15, save_tiny_pipeline

    folder = Path(model_dir) if model_dir else Path(scratch) / "sd"
    if (folder / "model_index.json").exists():
        return folder
    return save_random_sd15(folder) if sd15 else save_tiny_pipeline(folder)
