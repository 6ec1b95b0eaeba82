"""Where a run's outputs live, which checkpoint ``--ckpt_path`` loads, and what a failed start leaves.

Lightning puts checkpoints in ``<save_dir>/<name>/<version>/checkpoints`` of the first logger (CSV:
``version_N``, W&B: the run id) or ``<default_root_dir>/checkpoints`` without a logger, and every
invocation opens a new version. Its own ``ckpt_path="last"`` looks only in the new, empty version and
silently starts from step 0. Checkpoints here record the ``model`` and ``data`` config they were trained with
(:data:`CONFIG_KEY`), and a run's records (``config.yaml``, hparams, the next checkpoints) are what it runs:

* ``fit --ckpt_path last`` searches every version of the run's logger folder (and any explicit
  ``ModelCheckpoint(dirpath=...)``) for the newest checkpoint *of this configuration*, so two experiments that
  share a logger folder never resume each other. When it passes over newer checkpoints of another
  configuration it warns in one line (which ones, which keys differ): nobody resumes an older step by surprise.
  ``last_or_new`` starts a new run when there is nothing to resume.
* ``fit --ckpt_path X.ckpt`` resumes ``X`` only when it records this configuration (or none). Resuming a
  checkpoint of other settings would carry on its restored state (the optimizer's learning rate and weight
  decay, the schedule, the data stream) while the records claim the new settings, so it is refused in one
  sentence that names the differing keys (after the weights were found to fit the model: another LoRA rank
  or full fine-tuning is refused with its own sentence). Every resume, whatever its source, trains with the
  configured optimizer settings and schedule (see ``fork:``), so one from a checkpoint that records nothing
  cannot keep stale ones either.
* ``fit --ckpt_path fork:X.ckpt`` continues ``X`` on purpose with this run's settings: from its step, with its
  weights, optimizer moments and data position, and with the configured optimizer settings and schedule
  (``AlignmentModule`` puts them back after Lightning restores the checkpoint's). The fork's checkpoints record
  its own configuration, so ``last`` keeps the original run and the fork apart. A fork keeps the checkpoint's
  data stream, so one with another ``data.init_args.seed`` is refused.
* ``validate`` / ``test`` / ``predict --ckpt_path last`` match the ``model`` section only (the data section is
  the evaluation's). Checkpoints of runs that differ elsewhere (a data ablation sharing the folder) are
  candidates alike, so more than one of them is refused as ambiguous, naming each: give the path of the one
  meant. Exports record the checkpoint they used (:func:`checkpoint_identity`: path, sha256, recorded config).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from t2i_align.io import CheckpointError, check_trainable_state, load_checkpoint_file

#: ``--ckpt_path`` values resolved here: ``last`` must find a checkpoint; ``last_or_new`` starts a new run
#: when there is none (set-and-forget launch scripts, e.g. SLURM requeue).
RESUME_VALUES = ("last", "last_or_new")
#: ``--ckpt_path fork:X.ckpt``: continue ``X`` on purpose with this run's (other) settings.
FORK_PREFIX = "fork:"
#: Key under which checkpoints record the run's configuration (``{"model": ..., "data": ...}``).
CONFIG_KEY = "t2i_align_config"
#: Key under which checkpoints record the W&B run they were logged to (its id), so that a resume continues it.
WANDB_RUN_KEY = "t2i_align_wandb_run"
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


def recorded_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The run config a checkpoint records under :data:`CONFIG_KEY` (None for one written without it). A local
    file is memory-mapped: only the small record is read from a large (full fine-tuning) checkpoint."""
    if "://" in str(path):
        with get_filesystem(path).open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True).get(CONFIG_KEY)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(CONFIG_KEY)


def _read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint (tensors memory-mapped), or the one-sentence :class:`CheckpointError` of a file that is none."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - no zip archive to map: read it whole, or say what is wrong in one sentence
        return load_checkpoint_file(path)
    return checkpoint if isinstance(checkpoint, dict) and "state_dict" in checkpoint else load_checkpoint_file(path)


def _check_explicit(path: str, config: dict[str, Any], model: Any) -> list[str]:
    """The keys of ``config`` that a checkpoint given by path to ``fit`` records otherwise, after refusing one
    whose trained weights do not fit ``model`` (that sentence says more than the differing keys)."""
    checkpoint = _read_checkpoint(path)
    if model is not None:
        check_trainable_state(checkpoint["state_dict"], model, path)
    recorded = checkpoint.get(CONFIG_KEY)
    return [] if recorded is None else record_differences(recorded, config)


def record_differences(recorded: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Dotted keys of the sections of ``config`` (``model``, ``data``) that differ in a checkpoint's record."""
    return [k for section in config for k in config_differences(recorded.get(section), config[section], section)]


def key_list(differences: list[str], shown: int = 4) -> str:
    """``a, b, c, d ...``: the first ``shown`` differing keys for a one-line message."""
    return ", ".join(differences[:shown]) + (" ..." if len(differences) > shown else "")


def find_resume_checkpoint(trainer: L.Trainer, config: dict[str, Any]) -> tuple[list[tuple[Path, dict | None]], list[tuple[Path, str]]]:
    """Checkpoints under :func:`checkpoint_folders` and Lightning's ``hpc_ckpt_*.ckpt`` whose recorded config
    matches ``config`` (checkpoints without a record match), newest (by modification time) first.

    Returns ``(matches, passed_over)``: ``matches`` as ``(path, recorded config)``; ``passed_over`` as
    ``(path, why)`` for each checkpoint newer than the newest match (all of them when nothing matches) that is
    of another configuration or unreadable.
    """
    files = {p for folder in checkpoint_folders(trainer) if folder.is_dir() for p in folder.glob("*.ckpt")}
    files |= set(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
    matches: list[tuple[Path, dict | None]] = []
    passed_over: list[tuple[Path, str]] = []
    for path in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            recorded = recorded_config(path)
        except Exception:  # noqa: BLE001 - an unreadable file is not a candidate; say so if nothing else fits
            recorded, why = None, "is unreadable"
        else:
            differences = [] if recorded is None else record_differences(recorded, config)
            if not differences:
                matches.append((path, recorded))
                continue
            why = f"is of another configuration ({key_list(differences)} differ)"
        if not matches:
            passed_over.append((path, why))
    return matches, passed_over


def resolve_once(trainer: L.Trainer, resolve: Callable[[], Any]) -> Any:
    """``resolve()`` on global rank 0 only, its result (or its error) shared with every rank.

    On a multi-node run the ranks would otherwise each list the checkpoint folders of a shared filesystem, read
    every candidate's record and order them by modification time, which the nodes' attribute caches need not agree
    on: two ranks could resume different checkpoints. Where the processes were started by the cluster (SLURM,
    torchrun), Lightning's own distributed set-up (``strategy.setup_environment``) is run here, before ``fit``,
    so that the answer can be broadcast; ``fit`` repeats it and finds the process group up (Lightning's
    ``_init_dist_connection`` returns early then). Where Lightning starts the other processes itself (one node,
    ``LightningEnvironment``), they do not exist yet and every rank resolves on its own: they see one filesystem.
    (``LightningEnvironment`` cannot tell: its children see ``LOCAL_RANK`` and call themselves externally created,
    while rank 0 does not, so the ranks would disagree on whether to broadcast.)"""
    strategy = trainer.strategy
    environment = getattr(strategy, "cluster_environment", None)
    if (trainer.world_size == 1 or environment is None or isinstance(environment, LightningEnvironment)
            or not environment.creates_processes_externally or not hasattr(strategy, "setup_distributed")):
        return resolve()
    if not torch.distributed.is_initialized():
        strategy.setup_environment()
    shared: list[Any] = [None, None]
    if trainer.global_rank == 0:
        try:
            shared[0] = resolve()
        except Exception as error:  # noqa: BLE001 - raised on every rank below, not only here
            shared[1] = error
    torch.distributed.broadcast_object_list(shared, src=0)
    if shared[1] is not None:
        raise shared[1]
    return shared[0]


def recorded_wandb_run(path: str | os.PathLike | None) -> str | None:
    """The W&B run id a local checkpoint records (:data:`WANDB_RUN_KEY`), or None."""
    if path is None or not is_checkpoint_file_path(str(path)) or not Path(path).is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(WANDB_RUN_KEY)


def continue_wandb_run(trainer: L.Trainer, run_id: str | None) -> None:
    """Log a resumed fit to the W&B run its checkpoint was logged to: a SLURM requeue, or a resume by hand, then
    continues one W&B run (``WandbLogger`` opens runs with ``resume="allow"``) and writes its checkpoints into the
    same run folder, instead of opening a new run each time. An id set in the config
    (``trainer.logger.init_args.id``) is kept."""
    if run_id is None:
        return
    for logger in trainer.loggers:
        # WandbLogger reads its id from these two attributes when it creates the run (lightning
        # pytorch/loggers/wandb.py, WandbLogger.__init__ and .experiment); the run is created lazily, after this.
        if isinstance(logger, WandbLogger) and logger._id is None and logger._experiment is None:
            logger._id = logger._wandb_init["id"] = run_id
            L.pytorch.utilities.rank_zero_info(f"Continuing W&B run {run_id}, which the resumed checkpoint was logged to")


def is_checkpoint_file_path(value: str | None) -> bool:
    """Whether a ``--ckpt_path`` value names a local file (not ``last``/``best``/``hpc``/``registry``/a URL, nor
    a ``fork:`` of one, which :func:`resolve_ckpt_path` checks)."""
    return (bool(value) and value not in (*RESUME_VALUES, "best", "hpc", "registry") and "://" not in str(value)
            and not str(value).startswith(FORK_PREFIX))


def resolve_ckpt_path(value: str | None, trainer: L.Trainer, config: dict[str, Any], subcommand: str = "fit",
                      model: Any = None) -> str | None:
    """The checkpoint ``trainer.<subcommand>`` loads for ``--ckpt_path value`` (see the module docstring):
    ``last`` / ``last_or_new`` are searched (:func:`find_resume_checkpoint`), ``fork:X`` becomes ``X``, and
    ``fit`` from a file recording other settings than ``config`` is refused. Other values pass through; the
    file itself is read (and a bad one refused in one sentence) by ``AtomicCheckpointIO``."""
    if isinstance(value, str) and value.startswith(FORK_PREFIX):
        return _fork(value[len(FORK_PREFIX):], config, subcommand, model)
    if value in RESUME_VALUES:
        return _find_last(value, trainer, config, subcommand)
    if subcommand == "fit" and is_checkpoint_file_path(value):
        differences = _check_explicit(value, config, model)
        if differences:
            raise CheckpointError(
                f"{value} was trained with other settings ({key_list(differences, 6)} differ from this run's): resuming "
                "it would carry on its saved optimizer and data state while this run's records claim the new settings. "
                "Resume it with the config it records (the config.yaml of its run), or fork it on purpose with "
                f"--ckpt_path {FORK_PREFIX}{value} (continues from its step with this run's settings)."
            )
    return value


def _fork(path: str, config: dict[str, Any], subcommand: str, model: Any) -> str:
    if subcommand != "fit":
        raise CheckpointError(f"--ckpt_path {FORK_PREFIX}{path}: a fork continues training (fit); for {subcommand} "
                              f"give the checkpoint itself, --ckpt_path {path}")
    differences = _check_explicit(path, config, model)
    if "data.init_args.seed" in differences:  # the restored sampler state adopts the checkpoint's seed
        raise CheckpointError(f"--ckpt_path {FORK_PREFIX}{path}: a fork continues the checkpoint's data stream, its "
                              "data.init_args.seed included; keep that seed, or start a new run (no --ckpt_path) "
                              "for another order")
    settings = f"{key_list(differences, 6)} differ from its own" if differences else "the same as its own"
    L.pytorch.utilities.rank_zero_info(f"Forking {path}: continuing from its step with this run's settings ({settings})")
    return path


def _find_last(value: str, trainer: L.Trainer, config: dict[str, Any], subcommand: str) -> str | None:
    matches, passed_over = find_resume_checkpoint(trainer, config)
    where = ", ".join(str(f) for f in checkpoint_folders(trainer)) or trainer.default_root_dir
    if not matches:
        others = [p for p, why in passed_over if why.startswith("is of another")]
        detail = (f"; {len(passed_over)} checkpoint(s) there belong elsewhere, the newest {passed_over[0][0]} "
                  f"{passed_over[0][1]}") if passed_over else ""
        if value == "last_or_new":
            L.pytorch.utilities.rank_zero_info(f"--ckpt_path last_or_new: no checkpoint of this run in {where}{detail}; starting a new run")
            return None
        fork = (f", or continue {others[0]} with these settings on purpose: --ckpt_path {FORK_PREFIX}{others[0]}"
                if others and subcommand == "fit" else "")
        raise CheckpointError(
            f"--ckpt_path last: no checkpoint of this run in {where}{detail}. Drop --ckpt_path to start a new run, "
            f"pass --ckpt_path last_or_new to start one when there is nothing to resume{fork}."
        )
    path, recorded = matches[0]
    # fit compares the whole record; the other subcommands only the model: runs of other data (an ablation
    # sharing the folder) match too, and picking the newest of them would be a guess
    candidates = [(path, recorded)]
    for other, other_recorded in matches[1:] if subcommand != "fit" else []:
        if not any(_same_run(other_recorded, r) for _, r in candidates):
            candidates.append((other, other_recorded))
    if len(candidates) > 1:
        described = [f"{p} ({_run_difference(r, recorded)})" for p, r in candidates[1:]]
        raise CheckpointError(
            f"--ckpt_path last: {len(candidates)} runs in {where} fit this {subcommand} config: the newest {path} and "
            f"{'; '.join(described)}. Choose one with --ckpt_path <its .ckpt path>."
        )
    L.pytorch.utilities.rank_zero_info(f"Resuming from {path}")
    if passed_over:
        shown = "; ".join(f"{p} {why}" for p, why in passed_over[:3])
        more = f"; and {len(passed_over) - 3} more" if len(passed_over) > 3 else ""
        rank_zero_warn(
            f"--ckpt_path last resumes {path}, the newest checkpoint of this configuration, and passed over "
            f"{len(passed_over)} newer checkpoint(s): {shown}{more}. To continue one of those, run with its own config "
            f"(the config.yaml of its run), or fork it on purpose with --ckpt_path {FORK_PREFIX}<its .ckpt path>."
        )
    return str(path)


def _same_run(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    return not config_differences(a, b)


def _run_difference(recorded: dict | None, newest: dict | None) -> str:
    if recorded is None or newest is None:
        return "records no config" if recorded is None else "the newest records no config"
    return f"{key_list(config_differences(recorded, newest))} differ"


def checkpoint_identity(path: str | os.PathLike | None) -> dict[str, Any] | str:
    """What an output made from a checkpoint records about it: its path, the sha256 of the file (read in
    blocks) and the run config recorded in it; ``"base weights"`` when none was loaded."""
    if path is None:
        return "base weights"
    with get_filesystem(path).open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    where = str(path) if "://" in str(path) else os.path.abspath(path)
    return {"path": where, "sha256": digest, "config": recorded_config(path)}


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
    "FORK_PREFIX",
    "RESUME_VALUES",
    "CheckpointError",
    "checkpoint_folders",
    "checkpoint_identity",
    "config_differences",
    "find_resume_checkpoint",
    "is_checkpoint_file_path",
    "key_list",
    "output_roots",
    "record_differences",
    "recorded_config",
    "remove_unused_run_dir",
    "resolve_ckpt_path",
    "run_dir",
]
