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

import lightning as L
import numpy as np
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from t2i_align.callbacks.evaluation import GenerativeEvaluation
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


def count_tag(n: int) -> str:
    """``10000 -> "10k"``, ``30000 -> "30k"``, ``500 -> "500"`` (the N in ``fid10k_inception2048``)."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


class FIDEvaluation(GenerativeEvaluation):
    """FID of the generated evaluation images against a folder of real images.

    The sampler and prompt arguments are :class:`~t2i_align.callbacks.evaluation.GenerativeEvaluation`'s.

    Args:
        reference_dir: folder of real images (e.g. COCO val 2014; searched recursively).
        feature: Inception layer width (2048: the standard pool features; needs ``weights_path`` to the
            ``pt_inception-2015-12-05`` weights and torch-fidelity) or a feature module given by
            ``class_path`` (e.g. ``t2i_align.experts.clip.CLIPImageFeatures`` for ToyWorld).
        weights_path: local Inception weights file.
        extractor_name: name of the feature module in the metric name and the cache key (default:
            ``inception<feature>`` or the module's ``tag`` + width).
        reference_resolution: side the real images are centre-cropped and resized to.
        reference_limit: use only the first N real images (sorted by path).
        cache_dir: where reference statistics are cached.
    """

    def __init__(self, reference_dir: str, feature: int | torch.nn.Module = 2048, weights_path: str | None = None,
                 extractor_name: str | None = None, reference_resolution: int = 512, reference_limit: int | None = None,
                 cache_dir: str = ".cache/fid", **kwargs) -> None:
        super().__init__(**kwargs)
        self.reference_dir, self.reference_resolution = reference_dir, reference_resolution
        self.reference_limit, self.cache_dir = reference_limit, cache_dir
        self.metric = build_fid(feature, weights_path)
        if extractor_name is None:
            extractor_name = (f"inception{feature}" if isinstance(feature, int)
                              else f"{getattr(feature, 'tag', type(feature).__name__.lower())}{self.metric.real_features_sum.numel()}")
        self.extractor = extractor_name
        self._reference_ready = False

    @property
    def name(self) -> str:
        return f"fid{count_tag(len(self.items))}_{self.extractor}"

    def settings(self) -> dict:
        return {**super().settings(), "reference_dir": self.reference_dir, "reference_resolution": self.reference_resolution,
                "reference_limit": self.reference_limit}

    def reset(self, pl_module: L.LightningModule) -> None:
        self.metric.to(pl_module.device)
        if not self._reference_ready:
            trainer = pl_module.trainer
            states = None
            if trainer.is_global_zero:  # one rank computes (or loads) the reference; it alone holds it
                states = reference_statistics(self.metric, self.reference_dir, self.extractor,
                                              self.reference_resolution, self.cache_dir, self.reference_limit)
            trainer.strategy.barrier()
            if states is not None:
                set_reference(self.metric, states, holder=True)
            self._reference_ready = True
        self.metric.reset()  # fake features only (reset_real_features=False)

    def update(self, images: torch.Tensor, items, pl_module) -> None:
        self.metric.update(images, real=False)

    def compute(self, trainer, pl_module) -> dict[str, float]:
        return {self.name: float(self.metric.compute())}
