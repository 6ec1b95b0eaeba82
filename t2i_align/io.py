"""Atomic writes: a file or folder appears complete under its final name, or not at all; clear errors for
checkpoint files that cannot be loaded; removal of the temporaries a killed writer left behind."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from t2i_align.common import UserError

# Temporaries are named `.<target name>.<host>.<pid>.<random>.tmp` (and `.old` for the previous version of a
# folder being replaced), so a later start can tell whose they are and whether their writer is still alive.
_HOST = socket.gethostname().split(".")[0].replace("-", "_") or "host"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.(?P<kind>tmp|old)$")
#: Temporaries of writers on other machines (a shared file system) are removed only after this long.
FOREIGN_TEMP_AGE_S = 24 * 3600


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
    the temporary is removed and an existing ``path`` is left untouched. A folder cannot be swapped in one
    system call: the old one is first renamed aside, so a kill between the two renames leaves it under a
    temporary name, and :func:`clean_stale_temporaries` puts it back.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{path.name}.{_HOST}.{os.getpid()}."
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    except OSError as e:  # read-only, not a folder, no space: name what was to be written, not the temporary
        raise WriteError(f"cannot write {path}: {_reason(e, path.parent)}") from None
    target = tmp if is_dir else tmp / path.name
    try:
        try:
            yield target
        except (OSError, RuntimeError) as e:
            if _out_of_space(e):  # torch.save reports a full disk as a RuntimeError ("basic_ios::clear", ...)
                raise WriteError(f"cannot write {path}: {_reason(e, path.parent)}") from e
            raise
        _default_permissions(tmp)
        if not is_dir:
            with open(target, "rb") as f:
                os.fsync(f.fileno())
        if is_dir and path.exists():
            old = Path(str(tmp)[: -len(".tmp")] + ".old")
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: Longest file name most file systems take (NAME_MAX of ext4, XFS, tmpfs, ...), in bytes.
NAME_MAX = 255


def temporary_name_length(name: str) -> int:
    """Bytes in the name of :func:`atomic_path`'s temporary for a file called ``name`` (the longer of the two)."""
    return len(f".{name}.{_HOST}.{os.getpid()}.{'x' * 8}.tmp".encode())


class WriteError(UserError, OSError):
    """An output could not be written (read-only folder, a file where a folder should be, disk full)."""


def _out_of_space(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return "basic_ios::clear" in text or "file write failed" in text or "No space left" in text


def _reason(error: BaseException, folder: Path) -> str:
    if _out_of_space(error):
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        return f"no space left on the device of {folder} ({free})"
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{folder} is not writable ({error.strerror})"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} ({error.filename or folder})"
    return str(error)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temporaries(roots: Iterable[str | os.PathLike]) -> list[Path]:
    """Remove the temporaries of :func:`atomic_path` writers that died (killed during a save) under ``roots``.

    A temporary is stale when its writer ran on this machine and is gone, or ran elsewhere and the
    temporary is older than :data:`FOREIGN_TEMP_AGE_S`. A stale ``.old`` folder whose target is missing
    (killed between the two renames of a folder swap) is renamed back into place. Returns what was removed
    or restored.
    """
    done: list[Path] = []
    walked: list[Path] = []
    for root in sorted({Path(r).resolve() for r in roots}, key=lambda p: len(p.parts)):
        if not root.is_dir() or any(root.is_relative_to(w) for w in walked):
            continue  # missing, or inside a root already walked
        walked.append(root)
        for folder, dirs, files in os.walk(root):
            for name in list(dirs) + files:
                m = _TEMP_NAME.match(name)
                if m is None:
                    continue
                entry = Path(folder) / name
                if name in dirs:
                    dirs.remove(name)  # never descend into a temporary
                mine = m["host"] == _HOST
                if mine and _pid_alive(int(m["pid"])):
                    continue
                if not mine and time.time() - entry.lstat().st_mtime < FOREIGN_TEMP_AGE_S:
                    continue
                target = Path(folder) / m["name"]
                if m["kind"] == "old" and not target.exists():
                    os.replace(entry, target)
                elif entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                done.append(entry)
    return done


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong with it."""


def _describe_start(head: bytes) -> str:
    if len(head) >= 9 and head[8:9] == b"{":
        return "it looks like a safetensors file: exported weights, not a training checkpoint"
    if not head:
        return "it is empty"
    text = head.decode("utf-8", errors="replace")
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"it is a text file starting with {text[:16]!r}"
    return f"it starts with the bytes {head[:8]!r}"


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a Lightning checkpoint, or one :class:`CheckpointError`
    sentence naming the file and what is wrong (missing, not a PyTorch file, truncated, not a checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is a folder, not a .ckpt file")
    with open(path, "rb") as f:
        head = f.read(64)
    # torch.save writes a zip archive (PK..); the legacy format starts with a pickle protocol byte.
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {_describe_start(head)}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and plain containers, so it was not written by "
            f"t2i-align and is not loaded (weights_only=True): {str(e).splitlines()[0][:200]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is truncated or corrupt (a save interrupted, or a partial copy?): {str(e).splitlines()[0][:200]}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is a PyTorch file but not a Lightning checkpoint (no 'state_dict'; found {keys})")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temporary file next to the target, then renames it, and
    reads with :func:`load_checkpoint_file` (one clear sentence for a file that is not a usable checkpoint).

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

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return load_checkpoint_file(path, map_location if map_location is not None else "cpu")


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


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """A readable checkpoint whose trained tensors do not fit the configured model (another LoRA rank, target
    modules, LoRA vs full fine-tuning)."""


def _lora_ranks(shapes: dict[str, torch.Size]) -> list[int]:
    return sorted({shape[0] for key, shape in shapes.items() if "lora_A" in key})


def check_trainable_state(state: dict[str, torch.Tensor], module: Any, path: str | None = None) -> None:
    """Raise one sentence naming the checkpoint when its trainable state does not fit ``module`` (other LoRA
    rank or target modules, LoRA vs full fine-tuning) instead of PyTorch's line per mismatched tensor. ``module``
    is an ``AlignmentModule`` (its ``trainable_keys()`` name what a checkpoint holds)."""
    where = f"checkpoint {path}" if path else "the checkpoint"
    keys = module.trainable_keys()
    params = {k: p for k, p in module.named_parameters() if k in keys}
    expected, found = set(params), set(state)
    if expected != found:
        lora_here, lora_there = any("lora_" in k for k in expected), any("lora_" in k for k in found)
        if lora_here != lora_there:
            trained = "LoRA" if lora_there else "full UNet fine-tuning"
            here = "LoRA" if lora_here else "full UNet fine-tuning"
            raise CheckpointMismatchError(f"{where} was trained with {trained}; this model is set up for {here} "
                               "(model.init_args.generator.lora)")
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise CheckpointMismatchError(
            f"{where} does not fit this model: {len(missing)} trainable tensors missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); was it trained with other LoRA target_modules "
            "or another method?"
        )
    differing = [k for k in sorted(expected) if tuple(state[k].shape) != tuple(params[k].shape)]
    if differing:
        ranks_there = _lora_ranks({k: state[k].shape for k in differing})
        ranks_here = _lora_ranks({k: params[k].shape for k in differing})
        if ranks_there and ranks_here:
            show = lambda r: str(r[0]) if len(r) == 1 else str(r)  # noqa: E731
            raise CheckpointMismatchError(f"{where} was trained with LoRA rank {show(ranks_there)}; this model has rank "
                               f"{show(ranks_here)} (model.init_args.generator.lora.rank)")
        k = differing[0]
        raise CheckpointMismatchError(f"{where} does not fit this model: {len(differing)} tensors differ in shape, e.g. {k} is "
                           f"{tuple(state[k].shape)} there and {tuple(params[k].shape)} here")
