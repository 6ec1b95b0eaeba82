"""Atomic writes: a file or folder appears complete under its final name, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _default_permissions(root: Path) -> None:
    """mkdtemp creates 0700 folders (and some writers 0600 files): give what we publish the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path`` with ``os.replace``.

    The temporary lives in the same folder, so the final rename never crosses file systems. On error
    the temporary is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp if is_dir else tmp / path.name
    try:
        yield target
        _default_permissions(tmp)
        if not is_dir:
            with open(target, "rb") as f:
                os.fsync(f.fileno())
        if is_dir and path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temporary file next to the target, then renames it.

    Lightning's default local save moves a file from the system temp folder, which becomes a copy (and
    can leave a half-written checkpoint) when that folder is on another file system.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options for local paths")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def save_png(image, path: str | os.PathLike) -> Path:
    """Write a ``3 x H x W`` float tensor in [0, 1] (or a PIL image) as a PNG, atomically."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        image = Image.fromarray(array)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
