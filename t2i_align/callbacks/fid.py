"""FID with torchmetrics' ``FrechetInceptionDistance`` and reference statistics computed ahead or cached on disk.

The reference (real-image) statistics are torchmetrics' own ``real_features_*`` states: the number of images,
the sum of their features and the sum of the features' outer products (float64). They come either

* from a statistics file (``reference_stats``) written ahead by ``python -m t2i_align.commands.fid_reference``,
  sharded over ranks and resumable: every rank reads the file, no rank waits for another; or
* from a folder of real images (``reference_dir``), computed once by rank 0 when the callback is set up (every
  rank takes part in that barrier, also one without evaluation items) and cached under ``cache_dir`` keyed by the
  feature extractor and the exact image set (paths, sizes, modification times) and resolution.

Under DDP the metric's states are summed across ranks in ``compute()``: the reference is loaded into rank 0's
metric only (zeros elsewhere) so that the sum is the reference once.

Inception weights are never downloaded here (compute nodes often have no network, and every rank would fetch
them): ``weights_path`` names a local copy, or torch-fidelity's own download in torch's hub cache is used; else
:class:`InceptionWeightsError` says how to fetch the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from t2i_align.callbacks.evaluation import GenerativeEvaluation
from t2i_align.common import UserError
from t2i_align.io import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
#: ``format`` of the statistics files written by ``t2i_align.commands.fid_reference``.
STATS_FORMAT = "t2i_align.fid_reference/1"
FID_REFERENCE_COMMAND = "python -m t2i_align.commands.fid_reference"
WEIGHTS_OPTION = "init_args.weights_path of the FIDEvaluation callback"

# torch-fidelity's FID Inception weights (``URL_INCEPTION_V3`` in torch_fidelity/feature_extractor_inceptionv3.py,
# v0.3; read from the installed package when there is one). Without ``feature_extractor_weights_path`` its
# FeatureExtractorInceptionV3 calls ``torch.hub.load_state_dict_from_url(URL_INCEPTION_V3)``, which keeps the
# file in ``<torch.hub.get_dir()>/checkpoints/<file name of the URL>``.
_INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                  "weights-inception-2015-12-05-6726825d.pth")


class FIDError(UserError, ValueError):
    """A FID setting or statistics file that cannot be used (the message names the key or file)."""


class FIDFileError(UserError, FileNotFoundError):
    """A file or folder FID needs is missing (the message names the key and how to get it)."""


class InceptionWeightsError(FIDFileError):
    """The Inception weights are not available locally; the message says how to fetch them."""


def inception_url() -> str:
    """The URL torch-fidelity downloads its FID Inception weights from (its own constant when installed)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        return str(URL_INCEPTION_V3)
    except Exception:  # noqa: BLE001 - not installed (or another layout): the constant of torch-fidelity 0.3
        return _INCEPTION_URL


def cached_inception_weights() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps torch-fidelity's weights once downloaded."""
    url = inception_url()
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def fetch_weights_hint(option: str) -> str:
    url = inception_url()
    target = f"models/fid/{os.path.basename(url)}"
    return (f"on a machine with internet run `curl -L --create-dirs -o {target} {url}` (or "
            f"`python -c \"import torch; torch.hub.download_url_to_file('{url}', '{target}')\"`), copy the file "
            f"where the compute nodes can read it and set {option} to it; a copy in torch's hub cache "
            f"({cached_inception_weights()}) is used without setting anything")


def resolve_inception_weights(weights_path: str | os.PathLike | None, option: str = WEIGHTS_OPTION) -> str:
    """A local file of the Inception weights: ``weights_path`` if given (it must exist), else torch-fidelity's
    download in torch's hub cache. Never downloads: raises :class:`InceptionWeightsError` naming ``option`` and
    how to fetch the file."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(f"{option} is {weights_path}: no such file (the FID Inception weights); "
                                        + fetch_weights_hint(option))
        return str(path)
    cached = cached_inception_weights()
    if cached.is_file():
        return str(cached)
    raise InceptionWeightsError(
        f"FID with Inception features needs its weights as a local file, and {option} is not set (nothing is "
        f"downloaded: compute nodes have no network, and every rank would fetch it): " + fetch_weights_hint(option))


def build_fid(feature: int | torch.nn.Module = 2048, weights_path: str | None = None,
              weights_option: str = WEIGHTS_OPTION) -> FrechetInceptionDistance:
    """A FID metric on float images in [0, 1] that keeps its reference across ``reset()``.

    ``feature``: 64/192/768/2048 selects an Inception-v3 layer (torch-fidelity's FID Inception, converted from
    the TensorFlow ``2015-12-05`` graph; read from ``weights_path`` or torch's hub cache, never downloaded, see
    :func:`resolve_inception_weights`; needs ``pip install torch-fidelity``); or any module mapping the image
    batch to ``N x D`` features (e.g. a CLIP image tower). ``weights_option`` is the option named in errors."""
    if not isinstance(feature, int):
        return FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True)
    weights = resolve_inception_weights(weights_path, weights_option)
    try:
        # torch-fidelity loads a given path with torch.load and downloads only when it is None
        return FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True,
                                        feature_extractor_weights_path=weights)
    except ModuleNotFoundError as e:
        raise FIDError(f"FID with Inception features (feature={feature}) needs torch-fidelity: "
                       f"pip install -e \".[fid]\" ({e})") from None


def default_extractor_name(feature: int | torch.nn.Module, metric: FrechetInceptionDistance) -> str:
    """``inception<width>``, or the feature module's ``tag`` (else its class name) and width."""
    if isinstance(feature, int):
        return f"inception{feature}"
    return f"{getattr(feature, 'tag', type(feature).__name__.lower())}{metric.real_features_sum.numel()}"


def image_files(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted, at most ``limit``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FIDFileError(f"FID reference folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FIDError(f"FID reference folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
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


def real_statistics(metric: FrechetInceptionDistance, files: Sequence[Path], resolution: int,
                    batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The ``real_features_*`` states of ``metric`` for ``files`` alone (on CPU), computed in batches of
    ``batch_size`` in file order; ``metric`` is left as it was."""
    saved = {name: getattr(metric, name).clone() for name in REAL_STATES}
    try:
        for name in REAL_STATES:
            getattr(metric, name).zero_()
        for start in range(0, len(files), batch_size):
            metric.update(load_images(list(files[start:start + batch_size]), resolution).to(metric.device), real=True)
        return {name: getattr(metric, name).detach().cpu().clone() for name in REAL_STATES}
    finally:
        for name, value in saved.items():
            getattr(metric, name).copy_(value)


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
    states = real_statistics(metric, files, resolution, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"extractor": extractor, "folder": str(folder), "images": len(files), "resolution": resolution}
    with atomic_path(path) as tmp:
        torch.save({"states": states, "info": info}, tmp)
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    return states


def load_reference_stats(path: str | os.PathLike, extractor: str | None = None, dim: int | None = None,
                         key: str = "reference_stats") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(states, info)`` of a statistics file of ``fid_reference``, checked: its format, at least 2 images, and
    (when given) the extractor name and feature width the metric uses. Errors name ``key`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise FIDFileError(f"{path} ({key}): no such file; write it with `{FID_REFERENCE_COMMAND} {path} --images "
                           "DIR_OR_LIST` (see docs/running-on-gpu-clusters.md)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or not a torch file: one line naming it
        raise FIDError(f"{path} ({key}): not a readable statistics file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
        raise FIDError(f"{path} ({key}): not a statistics file of {FID_REFERENCE_COMMAND} (format {STATS_FORMAT})")
    states, info = data["states"], data.get("info", {})
    if int(states["real_features_num_samples"]) < 2:
        raise FIDError(f"{path} ({key}): holds {int(states['real_features_num_samples'])} images; FID needs at least 2")
    if extractor is not None and info.get("extractor") != extractor:
        raise FIDError(f"{path} ({key}) holds statistics of {info.get('extractor')!r} features, but the callback "
                       f"uses {extractor!r}: compute them with the same feature extractor")
    if dim is not None and states["real_features_sum"].numel() != dim:
        raise FIDError(f"{path} ({key}) holds {states['real_features_sum'].numel()}-d features, the callback's "
                       f"extractor gives {dim}-d")
    return states, info


def set_reference(metric: FrechetInceptionDistance, states: dict[str, torch.Tensor], holder: bool) -> None:
    """Load reference states into ``metric``; ``holder=False`` (every rank but 0) loads zeros, since the
    states are summed over ranks in ``compute()``."""
    for name in REAL_STATES:
        value = states[name].to(getattr(metric, name))
        getattr(metric, name).copy_(value if holder else torch.zeros_like(value))


def padding_mask(items: Any, n: int, padding: Any = None) -> torch.Tensor | None:
    """Which of ``n`` rows are padding (a repeated item that metrics must ignore), or None when unmarked: from
    ``padding`` if given, else ``items["padding"]`` (a batch dict), ``items.padding``, or each item's
    ``padding`` attribute."""
    if padding is None:
        if isinstance(items, Mapping):
            padding = items.get("padding")
        elif hasattr(items, "padding"):
            padding = items.padding
        elif isinstance(items, Sequence) and any(hasattr(it, "padding") for it in items):
            padding = [bool(getattr(it, "padding", False)) for it in items]
    if padding is None:
        return None
    mask = torch.as_tensor(padding, dtype=torch.bool).flatten().cpu()
    if mask.numel() != n:
        raise ValueError(f"padding flags for {mask.numel()} rows, but the batch has {n} images")
    return mask


def count_tag(n: int) -> str:
    """``10000 -> "10k"``, ``30000 -> "30k"``, ``500 -> "500"`` (the N in ``fid10k_inception2048``)."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


class FIDEvaluation(GenerativeEvaluation):
    """FID of the generated evaluation images against reference statistics of real images.

    The sampler and prompt arguments are :class:`~t2i_align.callbacks.evaluation.GenerativeEvaluation`'s.

    Args:
        reference_stats: statistics file written ahead by ``python -m t2i_align.commands.fid_reference`` (sharded
            over ranks, resumable): the way for large sets (COCO's 30-40k images), since it needs no rank to wait
            for another. Every rank reads it at construction.
        reference_dir: instead, a folder of real images (searched recursively), read by rank 0 when the callback
            is set up while the other ranks wait at a barrier; cached in ``cache_dir``.
        feature: Inception layer width (2048: the standard pool features; needs torch-fidelity and the weights
            as a local file, ``weights_path``) or a feature module given by ``class_path`` (e.g.
            ``t2i_align.experts.clip.CLIPImageFeatures`` for ToyWorld).
        weights_path: local Inception weights file (torch-fidelity's ``weights-inception-2015-12-05-*.pth``);
            default: torch's hub cache copy if there is one. Never downloaded.
        extractor_name: name of the feature module in the metric name, the cache key and the statistics file's
            check (default: ``inception<feature>`` or the module's ``tag`` + width).
        reference_resolution: side the real images are centre-cropped and resized to (``reference_dir``).
        reference_limit: use only the first N real images, sorted by path (``reference_dir``).
        cache_dir: where statistics computed from ``reference_dir`` are cached.
    """

    def __init__(self, reference_dir: str | None = None, feature: int | torch.nn.Module = 2048,
                 weights_path: str | None = None, extractor_name: str | None = None, reference_resolution: int = 512,
                 reference_limit: int | None = None, cache_dir: str = ".cache/fid", reference_stats: str | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if (reference_dir is None) == (reference_stats is None):
            raise FIDError("FIDEvaluation needs exactly one of reference_stats (a statistics file of "
                           f"{FID_REFERENCE_COMMAND}) and reference_dir (a folder of real images), got "
                           f"reference_stats={reference_stats}, reference_dir={reference_dir}")
        self.reference_dir, self.reference_stats = reference_dir, reference_stats
        self.reference_resolution, self.reference_limit = reference_resolution, reference_limit
        self.cache_dir = cache_dir
        self.metric = build_fid(feature, weights_path)
        self.extractor = extractor_name or default_extractor_name(feature, self.metric)
        self._states: dict[str, torch.Tensor] | None = None
        self._stats_info: dict[str, Any] = {}
        if reference_stats is not None:  # read now: a wrong file stops the run before any model loads
            self._states, self._stats_info = load_reference_stats(
                reference_stats, self.extractor, self.metric.real_features_sum.numel(),
                key="init_args.reference_stats of the FIDEvaluation callback")
        self._reference_ready = False

    @property
    def name(self) -> str:
        return f"fid{count_tag(len(self.items))}_{self.extractor}"

    def settings(self) -> dict:
        if self.reference_stats is not None:
            recorded = {f"reference_{k}": self._stats_info.get(k) for k in ("images", "resolution", "digest")}
            return {**super().settings(), "reference_stats": self.reference_stats, **recorded}
        return {**super().settings(), "reference_dir": self.reference_dir,
                "reference_resolution": self.reference_resolution, "reference_limit": self.reference_limit}

    def _prepare_reference(self, trainer: L.Trainer, device: torch.device) -> None:
        """Put the reference into rank 0's metric (zeros elsewhere). From ``reference_stats``: no collective at
        all. From ``reference_dir``: rank 0 computes (or loads) it while the others wait at a barrier; called from
        :meth:`setup`, which every rank runs, also one that gets no evaluation items."""
        if self._reference_ready:
            return
        self.metric.to(device)
        if self._states is None:
            if trainer.is_global_zero:  # one rank computes (or loads) the reference; it alone holds it
                def announce(n: int) -> None:
                    print(f"FID: computing reference statistics of {n} images in {self.reference_dir} on rank 0 "
                          f"(other ranks wait at a barrier; for large sets compute them ahead with "
                          f"{FID_REFERENCE_COMMAND} and set reference_stats)", flush=True)

                self._states = reference_statistics(self.metric, self.reference_dir, self.extractor,
                                                    self.reference_resolution, self.cache_dir, self.reference_limit,
                                                    on_compute=announce)
            trainer.strategy.barrier()
            if self._states is not None:
                set_reference(self.metric, self._states, holder=True)
        else:
            set_reference(self.metric, self._states, holder=trainer.is_global_zero)
        self._reference_ready = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict":  # evaluations run after validation and test only
            return
        # the module is not on its device yet: the strategy's device is where it will be
        self._prepare_reference(trainer, trainer.strategy.root_device)

    def reset(self, pl_module: L.LightningModule) -> None:
        self._prepare_reference(pl_module.trainer, pl_module.device)  # no-op after setup
        self.metric.to(pl_module.device)
        self.metric.reset()  # fake features only (reset_real_features=False)

    def update(self, images: torch.Tensor, items, pl_module, padding=None) -> None:
        mask = padding_mask(items, len(images), padding)
        if mask is not None:  # repeated items that pad a short rank: not part of the evaluation set
            images = images[~mask.to(images.device)]
        if len(images):
            self.metric.update(images, real=False)

    def compute(self, trainer, pl_module) -> dict[str, float]:
        return {self.name: float(self.metric.compute())}

