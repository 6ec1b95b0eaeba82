"""FID with torchmetrics' ``FrechetInceptionDistance`` and reference statistics cached on disk.

The reference (real-image) statistics are torchmetrics' own ``real_features_*`` states, computed once
from a folder of images and stored under ``cache_dir`` keyed by the feature extractor and the exact
image set (paths, sizes, modification times) and resolution; later runs and resumes load them.

Under DDP the metric's states are summed across ranks in ``compute()``: the cached reference is loaded
into rank 0's metric only (zeros elsewhere) so that the sum is the reference once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from t2i_align.io import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def build_fid(feature: int | torch.nn.Module = 2048, weights_path: str | None = None) -> FrechetInceptionDistance:
    """A FID metric on float images in [0, 1] that keeps its reference across ``reset()``.

    ``feature``: 64/192/768/2048 selects an Inception-v3 layer (torch-fidelity's FID Inception, i.e. the
    standard ``pt_inception-2015-12-05`` weights, read from ``weights_path`` since nothing can be
    downloaded here; needs ``pip install torch-fidelity``); or any module mapping the image batch to
    ``N x D`` features (e.g. a CLIP image tower)."""
    kwargs = {"feature_extractor_weights_path": weights_path} if isinstance(feature, int) else {}
    return FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True, **kwargs)


def image_files(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted, at most ``limit``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"FID reference folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"FID reference folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files[:limit]


def reference_key(extractor: str, files: Iterable[Path], resolution: int) -> str:
    """Cache key: the extractor's name, the resolution and every file's path, size and mtime."""
    h = hashlib.sha256(f"{extractor}|{resolution}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def load_images(files: list[Path], resolution: int) -> torch.Tensor:
    """Float ``N x 3 x R x R`` in [0, 1] (center crop to square, bicubic resize)."""
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.Resampling.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255


def reference_statistics(metric: FrechetInceptionDistance, folder: str | Path, extractor: str, resolution: int,
                         cache_dir: str | Path, limit: int | None = None, batch_size: int = 64,
                         on_compute: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """The ``real_features_*`` states of ``metric`` for the images of ``folder``: from the cache when the
    same extractor, image set and resolution were seen before, else computed (and cached atomically)."""
    files = image_files(folder, limit)
    key = reference_key(extractor, files, resolution)
    path = Path(cache_dir) / f"fid_ref_{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)["states"]
    if on_compute is not None:
        on_compute(len(files))
    saved = {name: getattr(metric, name).clone() for name in REAL_STATES}
    for name in REAL_STATES:
        getattr(metric, name).zero_()
    for start in range(0, len(files), batch_size):
        metric.update(load_images(files[start:start + batch_size], resolution).to(metric.device), real=True)
    states = {name: getattr(metric, name).detach().cpu().clone() for name in REAL_STATES}
    for name, value in saved.items():
        getattr(metric, name).copy_(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"extractor": extractor, "folder": str(folder), "images": len(files), "resolution": resolution}
    with atomic_path(path) as tmp:
        torch.save({"states": states, "info": info}, tmp)
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    return states


def set_reference(metric: FrechetInceptionDistance, states: dict[str, torch.Tensor], holder: bool) -> None:
    """Load reference states into ``metric``; ``holder=False`` (every rank but 0) loads zeros, since the
    states are summed over ranks in ``compute()``."""
    for name in REAL_STATES:
        value = states[name].to(getattr(metric, name))
        getattr(metric, name).copy_(value if holder else torch.zeros_like(value))
