"""Fill a cache of CoMat's real latents ahead of training (the paper's Appendix E): the frozen base model's final
latents of every training prompt, with the noise and sampler settings training uses::

    python -m t2i_align.commands.comat_cache OUT --config ... [--config ...] [overrides]
        [--batch-size N] [--limit N] [--device cuda]

with the training run's config stack; then train with ``--model.init_args.real_latents=OUT``. Layout and checks:
:mod:`t2i_align.lightning_modules.comat` (module docstring). Under torchrun/SLURM (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) each rank takes every ``WORLD_SIZE``-th prompt; finished files are skipped, so a killed run
resumes by running the same command again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from t2i_align.io import atomic_path
from t2i_align.lightning_modules.comat import CoMat
from t2i_align.lightning_modules.comat.real_latents import (
    CACHE_COMMAND,
    RECIPE_FILE,
    RealLatentsCacheError,
    cache_entry_name,
    read_recipe,
    recipe_differences,
)

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "16-mixed": torch.float16, "16": torch.float16}


def _rank_split() -> tuple[int, int, int | None]:
    """(rank, world size, local rank or None) from torchrun-style ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
    (0, 1, None) without them."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None and world is None:
        return 0, 1, None
    try:
        r, w = int(rank or ""), int(world or "")
    except ValueError:
        raise RealLatentsCacheError(f"RANK={rank!r} and WORLD_SIZE={world!r} must both be set to integers") from None
    if not 0 <= r < w:
        raise RealLatentsCacheError(f"RANK={r} must be in [0, WORLD_SIZE={w})")
    local = os.environ.get("LOCAL_RANK")
    return r, w, int(local) if local not in (None, "") else None


def _build_for_cache(out: Path, cli_args: Sequence[str]):
    """The CoMat module, its datamodule and the trainer's precision from the training config stack (no trainer
    is built: the command runs on any device)."""
    from t2i_align.cli import T2ICLI

    class _NoTrainerCLI(T2ICLI):
        def instantiate_trainer(self, **kwargs):
            return None

    # the cache folder as the module's own (so a fully fine-tuned generator is accepted); no discriminator
    args = [*cli_args, f"--model.init_args.real_latents={out}", "--model.init_args.adversarial_weight=0"]
    with warnings.catch_warnings():  # sys.argv holds this command's own arguments: not meant for the CLI
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within")
        cli = _NoTrainerCLI(args=args, run=False)
    if not isinstance(cli.model, CoMat):
        raise RealLatentsCacheError(f"the configs build a {type(cli.model).__name__}, not CoMat")
    return cli.model, cli.datamodule, cli.config.get("trainer.precision")


def _write_recipe(out: Path, recipe: dict[str, Any]) -> None:
    existing = read_recipe(out)
    if existing is None:
        if any(out.glob("*.pt")):
            raise RealLatentsCacheError(f"{out} holds .pt files but no {RECIPE_FILE}: not a cache of real latents "
                                        "written by this command; choose another folder")
        with atomic_path(out / RECIPE_FILE) as tmp:
            tmp.write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return
    diffs = recipe_differences(existing, recipe)
    if diffs:
        raise RealLatentsCacheError(f"{out / RECIPE_FILE} records other settings than the given configs "
                                    f"({'; '.join(diffs)}): use another folder for these settings")


def cache_real_latents(out: str | os.PathLike, cli_args: Sequence[str], batch_size: int | None = None,
                       limit: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Compute the frozen base model's final latents of the training prompts into ``out`` (see the module
    docstring): the recipe first, then one file per missing prompt, each written atomically.

    ``cli_args``: the training run's ``--config`` stack and overrides (as for ``t2i-align fit``, without the
    subcommand). ``batch_size``: prompts per sampling call (default: the data's ``batch_size``). ``limit``: only
    the first ``limit`` training prompts. ``device``: default ``cuda`` (``cuda:LOCAL_RANK`` under torchrun) when
    available, else ``cpu``. Rank split: with ``RANK``/``WORLD_SIZE`` set this process takes every
    ``WORLD_SIZE``-th prompt of the full deterministic list (the configured prompt order) and skips those already
    written, so ranks never race over who does what. Returns ``{"written": [file names], "skipped": n,
    "seconds": s}``.
    """
    from t2i_align.datamodules.prompts import load_prompt_sources
    from t2i_align.io import clean_stale_temporaries

    started = time.monotonic()
    if batch_size is not None and batch_size < 1:
        raise RealLatentsCacheError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise RealLatentsCacheError(f"--limit must be >= 1, got {limit}")
    rank, world, local_rank = _rank_split()
    out = Path(out)
    module, data, precision = _build_for_cache(out, cli_args)
    sources = getattr(data, "train_prompts", None)
    if not sources:
        raise RealLatentsCacheError("the cache command needs the training prompts: the given configs set no "
                                    "data.init_args.train_prompts")
    prompts, _ = load_prompt_sources(sources)
    entries: dict[str, tuple[str, str]] = {}  # file name -> (id, text), in the configured order, once each
    for p in prompts:
        entries.setdefault(cache_entry_name(p.id, p.text), (p.id, p.text))
    todo_all = list(entries.items())[:limit]
    mine = todo_all[rank::world]

    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries([out])  # of killed writers (a live rank's temporaries are kept)
    _write_recipe(out, module.real_latents_recipe())
    todo = [(name, pid, text) for name, (pid, text) in mine if not (out / name).exists()]
    skipped = len(mine) - len(todo)

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and local_rank is not None:
        device = f"cuda:{local_rank}"
    module.generator.to(device)
    dtype = _AUTOCAST.get(str(precision))  # the training step's autocast (Lightning's mixed precision)
    size = batch_size or getattr(data, "batch_size", None) or 4
    written: list[str] = []
    for start in range(0, len(todo), size):
        batch = todo[start:start + size]
        ids, texts = [pid for _, pid, _ in batch], [text for _, _, text in batch]
        with torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext():
            latents = module.frozen_latents(texts, module.prompt_seeds(ids, texts))
        for (name, pid, text), row in zip(batch, latents):
            with atomic_path(out / name) as tmp:  # clone: a row of the batch would save the whole batch's storage
                torch.save({"id": pid, "prompt": text, "latents": row.detach().float().cpu().clone()}, tmp)
            written.append(name)
    seconds = time.monotonic() - started
    share = f"{len(todo_all)} prompts"
    if world > 1:
        share = f"rank {rank} of {world}: {len(mine)} of {share}"
    print(f"real latents: {len(written)} written, {skipped} skipped (already there), {seconds:.1f} s "
          f"({share}, device {device}) -> {out}", flush=True)
    return {"written": written, "skipped": skipped, "seconds": seconds}


USAGE = (f"{CACHE_COMMAND} OUT --config FILE [--config FILE ...] [--key=value overrides] [--batch-size N] "
         "[--limit N] [--device DEVICE]")


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``OUT --config ...``: fill (or resume) a cache of real latents with the training config stack."""
    import sys

    from t2i_align.cli import quiet_known_noise

    from_python = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=CACHE_COMMAND, usage=USAGE, allow_abbrev=False, description=(
        "Compute the frozen base model's final latents of CoMat's training prompts ahead of training (resumable; "
        "rank-split under torchrun/SLURM via RANK, WORLD_SIZE, LOCAL_RANK). Every other argument goes to the "
        "training CLI (its --config stack and overrides); then set model.init_args.real_latents=OUT for training."))
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per sampling call (default: the data's)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N training prompts")
    parser.add_argument("--device", default=None, help="cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu")
    parser.add_argument("out", help="the cache folder (created or resumed)")
    options, rest = parser.parse_known_args(argv)
    quiet_known_noise()
    try:
        return cache_real_latents(options.out, rest, options.batch_size, options.limit, options.device)
    except RealLatentsCacheError as e:
        if from_python:
            raise
        sys.exit(f"{CACHE_COMMAND}: error: {e}")


if __name__ == "__main__":
    main()
