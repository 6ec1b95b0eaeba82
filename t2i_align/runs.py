"""Where a run's outputs live, which checkpoint ``--ckpt_path last`` resumes, and what a failed start leaves.

Lightning puts checkpoints in ``<save_dir>/<name>/<version>/checkpoints`` of the first logger (CSV:
``version_N``, W&B: the run id) or ``<default_root_dir>/checkpoints`` without a logger, and every
invocation opens a new version. Its own ``ckpt_path="last"`` looks only in the new, empty version and
silently starts from step 0. Here ``last`` searches every version of the run's logger folder (and any
explicit ``ModelCheckpoint(dirpath=...)``) for the newest checkpoint *of this configuration*: checkpoints
record the ``model`` and ``data`` config they were trained with, so two experiments that share a logger
folder never resume each other.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from t2i_align.io import CheckpointError

#: ``--ckpt_path`` values resolved here: ``last`` must find a checkpoint; ``last_or_new`` starts a new run
#: when there is none (set-and-forget launch scripts, e.g. SLURM requeue).
RESUME_VALUES = ("last", "last_or_new")
#: Key under which checkpoints record the run's configuration (``{"model": ..., "data": ...}``).
CONFIG_KEY = "t2i_align_config"
#: Config keys that may change between the segments of one run (they do not change what is trained).
RUNTIME_KEYS = frozenset({"data.init_args.num_workers"})


def run_dir(trainer: L.Trainer) -> Path:
    """This run's own folder: the parent of Lightning's default checkpoint folder (the first logger's
    version folder, or ``default_root_dir`` without a logger); mirrors ``ModelCheckpoint``'s rule."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
    return Path(trainer.default_root_dir)


def checkpoint_folders(trainer: L.Trainer) -> list[Path]:
    """Every folder where checkpoints of runs with this trainer config can be: each version of the first
    logger's folder (or ``<default_root_dir>/checkpoints``) and explicit ``ModelCheckpoint`` dirpaths."""
    folders = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    if trainer.loggers:
        logger = trainer.loggers[0]
        root = Path(logger.save_dir or trainer.default_root_dir, str(logger.name))
        folders += sorted(p for p in root.glob("*/checkpoints") if p.is_dir())
    else:
        folders.append(Path(trainer.default_root_dir) / "checkpoints")
    return folders


def config_differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config trees (``RUNTIME_KEYS`` ignored)."""
    if prefix in RUNTIME_KEYS:
        return []
    if isinstance(recorded, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(recorded) | set(current), key=str):
            out += config_differences(recorded.get(key), current.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if recorded == current else [prefix or "<root>"]


def find_resume_checkpoint(trainer: L.Trainer, config: dict[str, Any]) -> tuple[Path | None, list[str]]:
    """The newest checkpoint (by modification time) under :func:`checkpoint_folders` and Lightning's
    ``hpc_ckpt_*.ckpt`` whose recorded config matches ``config`` (checkpoints without a record match).

    Returns ``(path or None, notes)``: a note per newer checkpoint that was passed over, saying which keys
    differ, for the error message when nothing matches.
    """
    files = {p for folder in checkpoint_folders(trainer) if folder.is_dir() for p in folder.glob("*.ckpt")}
    files |= set(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
    notes: list[str] = []
    for path in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            # mmap: only the small config record is read from a large (full fine-tuning) checkpoint.
            recorded = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(CONFIG_KEY)
        except Exception:  # noqa: BLE001 - an unreadable file is not a candidate; say so if nothing else fits
            notes.append(f"{path} is unreadable")
            continue
        if recorded is None:
            return path, notes
        differences = [k for section in config for k in config_differences(recorded.get(section), config[section], section)]
        if not differences:
            return path, notes
        notes.append(f"{path} is of another configuration ({', '.join(differences[:4])}{' ...' if len(differences) > 4 else ''} differ)")
    return None, notes


def is_checkpoint_file_path(value: str | None) -> bool:
    """Whether a ``--ckpt_path`` value names a local file (not ``last``/``best``/``hpc``/``registry``/a URL)."""
    return bool(value) and value not in (*RESUME_VALUES, "best", "hpc", "registry") and "://" not in str(value)


def resolve_ckpt_path(value: str | None, trainer: L.Trainer, config: dict[str, Any]) -> str | None:
    """``last`` / ``last_or_new`` -> the checkpoint to resume (see :func:`find_resume_checkpoint`); other values
    pass through. The file itself is read (and a bad one refused in one sentence) by ``AtomicCheckpointIO``."""
    if value not in RESUME_VALUES:
        return value
    path, notes = find_resume_checkpoint(trainer, config)
    if path is not None:
        L.pytorch.utilities.rank_zero_info(f"Resuming from {path}")
        return str(path)
    where = ", ".join(str(f) for f in checkpoint_folders(trainer)) or trainer.default_root_dir
    detail = f"; {len(notes)} checkpoint(s) there belong elsewhere, the newest {notes[0]}" if notes else ""
    if value == "last_or_new":
        L.pytorch.utilities.rank_zero_info(f"--ckpt_path last_or_new: no checkpoint of this run in {where}{detail}; starting a new run")
        return None
    raise CheckpointError(
        f"--ckpt_path last: no checkpoint of this run in {where}{detail}. Drop --ckpt_path to start a new run, "
        "pass --ckpt_path last_or_new to start one when there is nothing to resume, or give a .ckpt path."
    )


def output_roots(trainer: L.Trainer, datamodule: Any = None) -> list[Path]:
    """Folders this run writes into through :func:`~t2i_align.io.atomic_path` (searched for stale temporaries
    at the start): the logger's folder, explicit ``dirpath`` / ``output_dir`` of callbacks and datamodule,
    ``default_root_dir`` unless it is the working directory (Lightning's default)."""
    roots = [Path(d) for d in [getattr(cb, "dirpath", None) for cb in trainer.callbacks] if d]
    if Path(trainer.default_root_dir).resolve() != Path.cwd().resolve():
        roots.append(Path(trainer.default_root_dir))
    if trainer.loggers:
        logger = trainer.loggers[0]
        roots.append(Path(logger.save_dir or trainer.default_root_dir, str(logger.name)))
    roots.append(Path(trainer.default_root_dir) / "checkpoints")
    if getattr(datamodule, "output_dir", None):
        roots.append(Path(datamodule.output_dir))
    return roots


#: Files a run folder may hold and still count as empty (written before anything was trained or measured).
_SETUP_FILES = frozenset({"config.yaml", "hparams.yaml"})


def remove_unused_run_dir(trainer: L.Trainer) -> Path | None:
    """After a failure: remove this run's logger version folder when it holds only what setup wrote
    (``config.yaml``, ``hparams.yaml``), so a run that never started leaves no folder and no used version."""
    if not trainer.is_global_zero or not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    folder = getattr(logger, "log_dir", None)  # CSV / TensorBoard version folders; W&B keeps its own record
    if not folder or not os.path.isdir(folder):
        return None
    entries = set(os.listdir(folder))
    if not entries <= _SETUP_FILES:
        return None
    shutil.rmtree(folder, ignore_errors=True)
    return Path(folder)


__all__ = [
    "CONFIG_KEY",
    "CheckpointError",
    "RESUME_VALUES",
    "checkpoint_folders",
    "config_differences",
    "find_resume_checkpoint",
    "is_checkpoint_file_path",
    "output_roots",
    "remove_unused_run_dir",
    "resolve_ckpt_path",
    "run_dir",
]
