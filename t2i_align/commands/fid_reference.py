"""FID reference statistics computed ahead of training, sharded over ranks and resumable::

    python -m t2i_align.commands.fid_reference OUT --images DIR_OR_LIST [--resolution 512] [--limit N]
        [--feature 2048 | --feature CLASS_PATH --feature-args JSON] [--weights PATH] [--batch-size 64] [--device cuda]

then set the FID callback's ``reference_stats: OUT`` (:class:`t2i_align.callbacks.fid.FIDEvaluation`): every rank
reads the file and none waits for another, where ``reference_dir`` makes rank 0 read every real image behind a
barrier (30-40k COCO images can outlast the collective timeout).

``--images``: a folder (searched recursively) or a text file of image paths, one a line (relative to the file's
folder). The list is sorted, then cut to ``--limit``, as the callback does with ``reference_dir``.

Statistics: torchmetrics' ``real_features_*`` states, i.e. the number of images, the sum of their features and the
sum of the features' outer products, in float64, so shards add up. Under torchrun (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) or ``srun`` (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``) rank ``r`` of ``W``
takes the ``r``-th of ``W`` contiguous shares of the list and writes ``OUT.shards/shard-<r>-of-<W>.pt`` atomically;
the rank that finds every shard written merges them (in rank order) into ``OUT`` (and ``OUT`` with ``.json``: what
it holds). A shard already written for the same settings and image set is skipped, so a killed run resumes by
running the same command again; a missing, unreadable or mismatched shard is computed again. ``--merge-only
--world-size W`` merges W shards without computing anything. No rank waits for another: there is no collective.

The merged sums equal one process's up to the order of float64 additions (exactly, when the features are exactly
representable; the tests use integer-valued features).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from t2i_align.callbacks.fid import (
    FID_REFERENCE_COMMAND,
    IMAGE_SUFFIXES,
    REAL_STATES,
    STATS_FORMAT,
    FIDFileError,
    build_fid,
    default_extractor_name,
    image_files,
    real_statistics,
)
from t2i_align.common import UserError
from t2i_align.io import atomic_path, clean_stale_temporaries

SHARD_FORMAT = "t2i_align.fid_reference.shard/1"


class FIDReferenceError(UserError, ValueError):
    """A problem with the command's inputs (the message names the option or file)."""


# ------------------------------------------------------------------------------------------------ inputs
def list_images(images: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """The sorted image files of a folder (recursive) or of a list file (one path a line, ``#`` comments and blank
    lines skipped, relative paths against the list's folder), at most the first ``limit``."""
    src = Path(images)
    if src.is_dir():
        return image_files(src, limit)
    if not src.is_file():
        raise FIDFileError(f"--images {src}: no such folder or list file")
    files = []
    for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line).expanduser()
        path = path if path.is_absolute() else src.parent / path
        if not path.is_file():
            raise FIDFileError(f"--images {src}, line {n}: {path}: no such file")
        files.append(path)
    if not files:
        raise FIDReferenceError(f"--images {src}: lists no images ({', '.join(IMAGE_SUFFIXES)} files, one a line)")
    return sorted(set(files))[:limit]


def images_digest(files: Sequence[Path]) -> str:
    """Identity of the image set: every file's resolved path, size and modification time, in order."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def rank_split() -> tuple[int, int, int | None]:
    """(rank, world size, local rank or None): torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, else an ``srun``
    step's ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID`` (not the batch script's own variables, which
    describe the allocation, not this process); (0, 1, None) without them."""
    env = os.environ
    if "RANK" in env or "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
    else:
        return 0, 1, None
    rank, world = env.get(names[0]), env.get(names[1])
    try:
        r, w = int(rank or ""), int(world or "")
    except ValueError:
        raise FIDReferenceError(f"{names[0]}={rank!r} and {names[1]}={world!r} must both be set to integers") from None
    if not 0 <= r < w:
        raise FIDReferenceError(f"{names[0]}={r} must be in [0, {names[1]}={w})")
    local = env.get(names[2])
    return r, w, int(local) if local not in (None, "") else None


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most one)."""
    return rank * n // world, (rank + 1) * n // world


def shard_path(out: str | os.PathLike, rank: int, world: int) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.shards" / f"shard-{rank:05d}-of-{world:05d}.pt"


def _build_feature(feature: str, feature_args: dict[str, Any] | None) -> int | torch.nn.Module:
    """An Inception width (``"2048"``) or an instance of a feature module's class path."""
    if feature.isdigit():
        if feature_args:
            raise FIDReferenceError("--feature-args applies to a feature module given by its class path, not to "
                                    f"--feature {feature}")
        return int(feature)
    module_name, _, cls_name = feature.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name) if module_name else None
    except ImportError as e:
        raise FIDReferenceError(f"--feature {feature}: cannot import {module_name} ({e})") from None
    if cls is None:
        raise FIDReferenceError(f"--feature {feature}: an Inception width (64, 192, 768, 2048) or a class path "
                                "such as t2i_align.experts.clip.CLIPImageFeatures")
    return cls(**(feature_args or {}))


# ------------------------------------------------------------------------------------------------ shards
def _read(path: Path) -> dict[str, Any] | None:
    """A shard or statistics file, or None when missing or unreadable (e.g. truncated by a copy)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing, truncated, not a torch file: computed again
        return None
    return data if isinstance(data, dict) else None


def _matches(data: dict[str, Any] | None, recipe: dict[str, Any], fmt: str) -> bool:
    return data is not None and data.get("format") == fmt and data.get("recipe") == recipe


def compute_shard(out: str | os.PathLike, files: Sequence[Path], recipe: dict[str, Any], metric, rank: int,
                  world: int, batch_size: int = 64) -> tuple[Path, bool]:
    """Write rank ``rank``'s shard of ``files`` (the full sorted list) unless a shard of the same ``recipe`` is
    there. ``metric``: the FID metric whose feature extractor to use (its ``real_features_*`` states are left as
    they were). Returns (shard path, whether it was computed)."""
    path = shard_path(out, rank, world)
    shard_recipe = {**recipe, "rank": rank, "world": world}
    if _matches(_read(path), shard_recipe, SHARD_FORMAT):
        return path, False
    start, end = shard_bounds(len(files), rank, world)
    states = real_statistics(metric, files[start:end], recipe["resolution"], batch_size)
    with atomic_path(path) as tmp:
        torch.save({"format": SHARD_FORMAT, "recipe": shard_recipe, "states": states, "start": start, "end": end}, tmp)
    return path, True


def missing_shards(out: str | os.PathLike, recipe: dict[str, Any], world: int) -> list[int]:
    """Ranks whose shard of this ``recipe`` is not (validly) written yet."""
    return [r for r in range(world)
            if not _matches(_read(shard_path(out, r, world)), {**recipe, "rank": r, "world": world}, SHARD_FORMAT)]


def merge_shards(out: str | os.PathLike, recipe: dict[str, Any], world: int,
                 extra: dict[str, Any] | None = None) -> Path:
    """Sum the ``world`` shards of ``recipe`` in rank order into the statistics file ``out`` (atomically), with
    ``out``'s ``.json`` sibling describing it (the recipe, ``extra`` and the number of shards)."""
    out = Path(out)
    total: dict[str, torch.Tensor] | None = None
    for r in range(world):
        data = _read(shard_path(out, r, world))
        if not _matches(data, {**recipe, "rank": r, "world": world}, SHARD_FORMAT):
            raise FIDReferenceError(f"{shard_path(out, r, world)}: missing or not of these settings; run rank {r} "
                                    f"of {world} again (the same command with RANK={r} WORLD_SIZE={world})")
        states = data["states"]
        total = {k: states[k].clone() for k in REAL_STATES} if total is None else {
            k: total[k] + states[k] for k in REAL_STATES}
    assert total is not None
    n = int(total["real_features_num_samples"])
    if n != recipe["images"]:
        raise FIDReferenceError(f"the shards of {out} hold {n} images, the list {recipe['images']}")
    info = {**recipe, **(extra or {}), "shards": world}
    with atomic_path(out) as tmp:
        torch.save({"format": STATS_FORMAT, "recipe": recipe, "info": info, "states": total}, tmp)
    with atomic_path(out.with_name(out.name + ".json")) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------ command
def fid_reference(out: str | os.PathLike, images: str | os.PathLike, resolution: int = 512, limit: int | None = None,
                  feature: str | int | torch.nn.Module = 2048, feature_args: dict[str, Any] | None = None,
                  weights: str | None = None, extractor_name: str | None = None, batch_size: int = 64,
                  device: str | None = None, merge_only: bool = False, rank: int | None = None,
                  world: int | None = None) -> dict[str, Any]:
    """Compute this rank's shard (see the module docstring) and merge when every shard is there. ``rank`` and
    ``world`` default to the environment's (:func:`rank_split`). Returns ``{"out": path or None, "shard": path,
    "computed": bool, "missing": [ranks], "seconds": s}``."""
    started = time.monotonic()
    if resolution < 1 or batch_size < 1 or (limit is not None and limit < 2):
        raise FIDReferenceError(f"--resolution and --batch-size must be >= 1 and --limit >= 2, got {resolution}, "
                                f"{batch_size}, {limit}")
    local_rank = None
    if rank is None or world is None:
        env_rank, env_world, local_rank = rank_split()
        rank = env_rank if rank is None else rank
        world = env_world if world is None else world
    if not 0 <= rank < world:
        raise FIDReferenceError(f"rank {rank} must be in [0, world size {world})")
    out = Path(out)
    files = list_images(images, limit)
    if len(files) < 2:
        raise FIDReferenceError(f"--images {images}: {len(files)} image; FID needs at least 2")

    if isinstance(feature, str):
        feature = _build_feature(feature, feature_args)
    metric = None
    if not merge_only or not isinstance(feature, int):  # a module's width is known once the metric probed it
        metric = build_fid(feature, weights, weights_option="--weights")
    name = extractor_name or (f"inception{feature}" if isinstance(feature, int)
                              else default_extractor_name(feature, metric))
    recipe = {"extractor": name, "resolution": resolution, "images": len(files), "digest": images_digest(files)}
    extra = {"source": str(Path(images).resolve()), "limit": limit}

    existing = _read(out) if out.exists() else None
    if existing is not None and existing.get("format") == STATS_FORMAT and existing.get("recipe") == recipe:
        print(f"FID reference: {out} already holds these statistics ({len(files)} images, {name})", flush=True)
        return {"out": out, "shard": None, "computed": False, "missing": [], "seconds": time.monotonic() - started}
    if out.exists() and existing is not None and existing.get("format") == STATS_FORMAT:
        theirs = existing.get("recipe") or {}
        diffs = "; ".join(f"{k}: {theirs.get(k)} there, {recipe[k]} now" for k in recipe if theirs.get(k) != recipe[k])
        raise FIDReferenceError(f"{out} holds statistics of other settings or another image set ({diffs}; the "
                                "digest covers every image's path, size and modification time): remove it or choose "
                                "another path")
    if out.exists() and existing is None and out.stat().st_size > 0:
        raise FIDReferenceError(f"{out} exists and is not a statistics file of {FID_REFERENCE_COMMAND}")

    shard, computed = None, False
    if not merge_only:
        shard_path(out, rank, world).parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries([shard_path(out, rank, world).parent])  # of killed writers (live ones are kept)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and local_rank is not None:
            device = f"cuda:{local_rank}"
        metric.to(device)
        shard, computed = compute_shard(out, files, recipe, metric, rank, world, batch_size)
        start, end = shard_bounds(len(files), rank, world)
        print(f"FID reference: shard {rank} of {world} ({end - start} of {len(files)} images) "
              f"{'written' if computed else 'already there'}: {shard}", flush=True)
    missing = missing_shards(out, recipe, world)
    result: dict[str, Any] = {"out": None, "shard": shard, "computed": computed, "missing": missing}
    if missing:
        print(f"FID reference: waiting for the shards of rank(s) {missing} of {world}; the rank that writes the "
              f"last one merges (or: the same command with --merge-only --world-size {world})", flush=True)
    else:
        result["out"] = merge_shards(out, recipe, world, extra)
        print(f"FID reference: {len(files)} images ({name}, {resolution} px) -> {out}", flush=True)
    result["seconds"] = time.monotonic() - started
    return result


USAGE = (f"{FID_REFERENCE_COMMAND} OUT --images DIR_OR_LIST [--resolution N] [--limit N] [--feature 2048|CLASS_PATH] "
         "[--feature-args JSON] [--weights PATH] [--batch-size N] [--device DEVICE] [--merge-only --world-size N]")


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    from_python = argv is not None
    parser = argparse.ArgumentParser(prog=FID_REFERENCE_COMMAND, usage=USAGE, allow_abbrev=False, description=(
        "Compute FID reference statistics of real images ahead (rank-split under torchrun/srun, resumable); then "
        "set the FID callback's reference_stats to OUT."))
    parser.add_argument("out", help="the statistics file to write (shards go to OUT.shards/)")
    parser.add_argument("--images", required=True, help="a folder of images (recursive) or a file listing them")
    parser.add_argument("--resolution", type=int, default=512, help="centre crop, resized to N x N (default 512: "
                        "the callback's reference_resolution)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the sorted list")
    parser.add_argument("--feature", default="2048", help="Inception width (64, 192, 768, 2048) or a feature "
                        "module's class path (default 2048)")
    parser.add_argument("--feature-args", default=None, help="JSON object of the feature module's init arguments")
    parser.add_argument("--weights", default=None, help="local Inception weights file (torch-fidelity's "
                        "weights-inception-2015-12-05-*.pth); default: torch's hub cache copy")
    parser.add_argument("--extractor-name", default=None, help="name recorded for the features (default: as the "
                        "callback names them)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu")
    parser.add_argument("--merge-only", action="store_true", help="only merge the shards written so far")
    parser.add_argument("--world-size", type=int, default=None, help="number of shards (default: WORLD_SIZE or "
                        "SLURM_STEP_NUM_TASKS, else 1); with --merge-only outside the launcher that wrote them")
    options = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        feature_args = json.loads(options.feature_args) if options.feature_args else None
        if feature_args is not None and not isinstance(feature_args, dict):
            raise FIDReferenceError(f"--feature-args must be a JSON object, got {options.feature_args}")
        return fid_reference(options.out, options.images, options.resolution, options.limit, options.feature,
                             feature_args, options.weights, options.extractor_name, options.batch_size,
                             options.device, options.merge_only, rank=0 if options.merge_only and
                             options.world_size else None, world=options.world_size)
    except (UserError, json.JSONDecodeError) as e:
        if from_python:
            raise
        sys.exit(f"{FID_REFERENCE_COMMAND}: error: {e}")


if __name__ == "__main__":
    main()
