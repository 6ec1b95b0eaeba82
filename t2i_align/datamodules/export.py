"""Exports for the official benchmark scorers (``t2i-align predict``): the folder layouts they read and
the datamodule of images still to render (the writer: ``t2i_align.callbacks.benchmark_export.BenchmarkWriter``).

Each layout names the image file(s) of prompt ``index`` (file order) and can parse a name back; some write
metadata next to the images. Conventions (from each benchmark's own generation scripts and READMEs):

* ``t2i_compbench``: ``samples/<prompt>_<6-digit index>.png``, 10 images per prompt, the index running
  over the whole val file in order (prompt ``i``, image ``k`` -> ``i * 10 + k``);
* ``geneval``: ``<5-digit prompt index>/metadata.jsonl`` (the prompt's record) and
  ``<5-digit>/samples/<4-digit k>.png``, 4 per prompt;
* ``dpg_bench``: one 2 x 2 grid of 4 images per prompt, ``<item id>.png`` (the prompt file's stem);
* ``tifa``: ``<id>.png`` per prompt plus ``tifa_images.json`` (``{id: image path}``, TIFA's image input);
* ``multigen``: ``<prompt index>_<k>.png``, 10 per prompt.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
from torch.utils.data import DataLoader

from t2i_align.common import ConfigError, derive_seed
from t2i_align.datamodules.datamodule import check_for_generator
from t2i_align.datamodules.prompts import Prompt, PromptSource, read_prompts
from t2i_align.datamodules.sampler import PaddedCollate, PaddedDataset, ShardSampler
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.io import NAME_MAX, atomic_path, temporary_name_length
from t2i_align.runs import checkpoint_identity, config_differences


@dataclass(frozen=True)
class Layout:
    """A benchmark's layout. ``grid``: images per file side (DPG-Bench writes 2 x 2 grids)."""

    name: str
    images_per_prompt: int
    grid: int = 1

    def files(self, prompt: Prompt, index: int) -> list[str]:
        """Relative paths of the files of prompt ``index``: one per image, or one per grid."""
        n = self.images_per_prompt
        if self.name == "t2i_compbench":
            if "/" in prompt.text or "\x00" in prompt.text:
                raise ConfigError(f"prompt {prompt.source}:{prompt.id} {prompt.text!r} cannot be a file name")
            return [f"samples/{prompt.text}_{index * n + k:06d}.png" for k in range(n)]
        if self.name == "geneval":
            return [f"{index:05d}/samples/{k:04d}.png" for k in range(n)]
        if self.name == "dpg_bench":
            return [f"{_safe_id(prompt)}.png"]
        if self.name == "tifa":
            return [f"{_safe_id(prompt)}.png" if n == 1 else f"{_safe_id(prompt)}_{k}.png" for k in range(n)]
        if self.name == "multigen":
            return [f"{index}_{k}.png" for k in range(n)]
        raise ValueError(f"unknown layout {self.name!r}; expected one of {sorted(LAYOUTS)}")

    def parse(self, relpath: str) -> tuple[str | int, int]:
        """Inverse of :meth:`files`: (prompt text for T2I-CompBench, prompt index for GenEval/MultiGen, prompt
        id for DPG-Bench/TIFA; image number k)."""
        path = Path(relpath)
        if self.name == "t2i_compbench":
            text, number = path.stem.rsplit("_", 1)
            return text, int(number) % self.images_per_prompt
        if self.name == "geneval":
            return int(path.parts[0]), int(path.stem)
        if self.name == "multigen":
            index, k = path.stem.split("_")
            return int(index), int(k)
        if self.name in ("dpg_bench", "tifa"):
            m = re.fullmatch(r"(.+)_(\d+)", path.stem) if self.name == "tifa" and self.images_per_prompt > 1 else None
            return (m[1], int(m[2])) if m else (path.stem, 0)
        raise ValueError(f"unknown layout {self.name!r}")

    def finalize(self, root: str | Path, prompts: Sequence[Prompt]) -> None:
        """Write the layout's metadata files (atomically)."""
        root = Path(root)
        if self.name == "geneval":
            for index, p in enumerate(prompts):
                record = {**p.meta, "prompt": p.text}
                target = root / f"{index:05d}" / "metadata.jsonl"
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as tmp:
                    tmp.write_text(json.dumps(record) + "\n")
        elif self.name == "tifa":
            mapping = {p.id: str(root / self.files(p, i)[0]) for i, p in enumerate(prompts)}
            with atomic_path(root / "tifa_images.json") as tmp:
                tmp.write_text(json.dumps(mapping, indent=1) + "\n")


def _safe_id(prompt: Prompt) -> str:
    if "/" in prompt.id or not prompt.id:
        raise ConfigError(f"prompt id {prompt.id!r} of {prompt.source} cannot be a file name")
    return prompt.id


def check_name_length(prompt: Prompt, relpath: str) -> None:
    """Refuse, before anything is rendered, a file name the file system would refuse midway (T2I-CompBench's layout
    names files after the prompt text; the atomic write's temporary adds host, pid and a suffix)."""
    name = Path(relpath).name
    if temporary_name_length(name) > NAME_MAX:
        raise ConfigError(
            f"prompt {prompt.source}:{prompt.id} gives the file name '{name[:40]}...' ({len(name.encode())} bytes), "
            f"longer than file systems take ({NAME_MAX} bytes, less {temporary_name_length('') } for the atomic "
            "write's temporary): shorten the prompt or export it with another layout"
        )


LAYOUTS = {
    "t2i_compbench": Layout("t2i_compbench", 10),
    "geneval": Layout("geneval", 4),
    "dpg_bench": Layout("dpg_bench", 4, grid=2),
    "tifa": Layout("tifa", 1),
    "multigen": Layout("multigen", 10),
}


def get_layout(name: str, images_per_prompt: int | None = None) -> Layout:
    """The named layout, optionally with another number of images per prompt (not for grids)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; expected one of {sorted(LAYOUTS)}")
    base = LAYOUTS[name]
    if images_per_prompt is None or images_per_prompt == base.images_per_prompt:
        return base
    if base.grid > 1:
        raise ValueError(f"{name}: a {base.grid} x {base.grid} grid holds exactly {base.images_per_prompt} images")
    return Layout(name, images_per_prompt)


@dataclass(frozen=True)
class ExportJob:
    """One output file: ``len(seeds)`` images of ``prompt`` (several make a grid)."""

    prompt: str
    seeds: tuple[int, ...]
    path: str  # absolute
    sampling: dict  # SamplingSettings.as_dict(): batches hold plain containers (see collate_jobs)


class BenchmarkExportData(L.LightningDataModule):
    """Every image a benchmark needs, minus those already on disk (a rerun resumes), split across ranks: each
    job is rendered and written once (a rank short of jobs repeats one, marked in ``batch["padding"]``, that the
    writer skips). Seeds depend on (seed, set, prompt id, image number) only.

    ``<output_dir>/export.json`` records the recipe (layout, prompts digest, seed, sampler settings, weights
    digest, and the checkpoint loaded with ``--ckpt_path``: its path, the sha256 of the file and the run config
    recorded in it, or ``"base weights"``) before the first image is written. A rerun into the same
    ``output_dir`` resumes only when it records the same recipe (the checkpoint's path aside: the same file
    moved is the same checkpoint); anything else is refused before an image is written.

    Args:
        prompts: the benchmark's prompt file (T2I-CompBench val txt, GenEval ``evaluation_metadata.jsonl``,
            DPG-Bench ``prompts/`` folder, TIFA text inputs, MultiGen JSON).
        layout: ``t2i_compbench`` | ``geneval`` | ``dpg_bench`` | ``tifa`` | ``multigen``.
        output_dir: where the layout is written.
        images_per_prompt: override the layout's default (10, 4, 4 in a grid, 1, 10).
        sampling: sampler settings (recorded in ``output_dir/export.json``).
        batch_size: output files per generation batch and rank.
        seed: base of the per-image seeds.
    """

    def __init__(self, prompts: PromptSource, layout: str, output_dir: str, images_per_prompt: int | None = None,
                 sampling: SamplingSettings = SamplingSettings(), batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.source = prompts if isinstance(prompts, PromptSource) else PromptSource(**prompts)
        self.layout = get_layout(layout, images_per_prompt)
        self.output_dir = Path(output_dir)
        self.sampling = sampling
        self.batch_size, self.seed = batch_size, seed
        self.prompts = None
        self.jobs: list[ExportJob] = []
        self.skipped = 0
        self._recipe: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        self.prompts = read_prompts(self.source.path, self.source.format, self.source.name)[: self.source.limit]
        per_file = self.layout.images_per_prompt if self.layout.grid > 1 else 1
        jobs, skipped = [], 0
        for index, p in enumerate(self.prompts):
            for f, rel in enumerate(self.layout.files(p, index)):
                check_name_length(p, rel)
                target = self.output_dir / rel
                if target.exists():  # written atomically: an existing file is complete
                    skipped += 1
                    continue
                seeds = tuple(derive_seed(self.seed, p.source, p.id, f * per_file + k) % (2**31) for k in range(per_file))
                jobs.append(ExportJob(p.text, seeds, str(target), self.sampling.as_dict()))
        self.jobs, self.skipped = jobs, skipped
        check_for_generator(self.trainer, None, "", {f"prompts ({self.source.path})": self.prompts})

    def recipe(self, pl_module=None) -> dict:
        """What decides the images of this export: layout, prompts (ids and texts), seed, sampler settings and,
        given the module, its weights (:func:`weights_identity`) and the checkpoint they were loaded from
        (:func:`~t2i_align.runs.checkpoint_identity`)."""
        if self.prompts is None:
            raise RuntimeError("BenchmarkExportData.recipe() needs setup() first")
        listing = json.dumps([[p.source, p.id, p.text] for p in self.prompts], ensure_ascii=False)
        recipe = {
            "layout": self.layout.name,
            "images_per_prompt": self.layout.images_per_prompt,
            "prompts": {"path": str(self.source.path), "count": len(self.prompts),
                        "sha256": hashlib.sha256(listing.encode()).hexdigest()},
            "seed": self.seed,
            "sampling": self.sampling.as_dict(),
        }
        if pl_module is not None:
            recipe["weights"] = weights_identity(pl_module)
            recipe["checkpoint"] = checkpoint_identity(pl_module.trainer.ckpt_path)
        return recipe

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if trainer is not None:
            # Here, not in setup: Lightning asks for the loader after loading --ckpt_path, so the weights are
            # final; and it skips every predict hook when no file is left to render.
            self._begin(trainer)
        # Every rank gets as many jobs as the others, at least one, also when fewer files than ranks are left (a
        # resumed export): Lightning skips the predict loop of a rank without any, and with it the writer's
        # barrier in on_predict_end that the other ranks then wait in. A repeated job is marked in
        # batch["padding"]; the writer does not write it again.
        return DataLoader(PaddedDataset(self.jobs), batch_size=self.batch_size,
                          sampler=ShardSampler(len(self.jobs), world, rank), collate_fn=PaddedCollate(collate_jobs))

    def _begin(self, trainer: L.Trainer) -> None:
        """Refuse a folder made with another recipe; record this one before the first image is written."""
        recipe = self.recipe(trainer.lightning_module)
        check_export_folder(self.output_dir, recipe, self.skipped)  # every rank reaches the same verdict
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.write_manifest(recipe, complete=False)
            if not self.jobs:  # nothing left to render (a finished or fully resumed export): complete it now
                self.finish()
        trainer.strategy.barrier()
        self._recipe = recipe

    def write_manifest(self, recipe: dict, complete: bool) -> None:
        info = {"recipe": recipe, "complete": complete, "files_skipped_as_existing": self.skipped,
                "files_written": len(self.jobs) if complete else 0}
        with atomic_path(self.output_dir / MANIFEST) as tmp:
            tmp.write_text(json.dumps(info, indent=2) + "\n")

    def finish(self) -> None:
        """Rank 0, once every image is written: the layout's metadata files and the completed record."""
        self.layout.finalize(self.output_dir, self.prompts)
        self.write_manifest(self._recipe if self._recipe is not None else self.recipe(), complete=True)


MANIFEST = "export.json"


def weights_identity(pl_module) -> dict:
    """The method, its base model and a digest of its trainable weights (after any ``--ckpt_path`` load)."""
    h = hashlib.sha256()
    trained = pl_module.trainable_keys()
    for name, p in sorted(pl_module.named_parameters()):
        if name in trained:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    cls = type(pl_module)
    return {"method": f"{cls.__module__}.{cls.__qualname__}", "pretrained": str(pl_module.generator.config.pretrained),
            "trainable_sha256": h.hexdigest()}


def check_export_folder(folder: Path, recipe: dict, existing_files: int) -> None:
    """Refuse to add to a folder whose images were made from other prompts, weights or sampler settings."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if existing_files:
            raise RuntimeError(
                f"{folder} already holds {existing_files} of this export's image files but no {MANIFEST} recording "
                "how they were made, so they cannot be reused: choose an empty output_dir or remove the folder"
            )
        return
    try:
        recorded = json.loads(manifest.read_text())["recipe"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RuntimeError(f"{manifest} is not an export record of this version of t2i-align (no 'recipe'); "
                           "choose another output_dir or remove the folder") from None
    differences = [k for k in config_differences(recorded, recipe) if k != "checkpoint.path"]
    if differences:
        shown = ", ".join(k if k.startswith("checkpoint") else f"{k} ({_at(recorded, k)!r} there, {_at(recipe, k)!r} now)"
                          for k in differences[:3])
        checkpoints = (f" (made from {_checkpoint_name(recorded)}, now from {_checkpoint_name(recipe)})"
                       if any(k.startswith("checkpoint") for k in differences) else "")
        raise RuntimeError(
            f"{folder} holds an export of other settings: {shown}{' ...' if len(differences) > 3 else ''}{checkpoints}. "
            "Its images cannot be reused: choose another output_dir, or remove the folder to redo the export"
        )


def _checkpoint_name(recipe: dict) -> str:
    entry = recipe.get("checkpoint", "an unrecorded checkpoint")
    return entry.get("path", "?") if isinstance(entry, dict) else str(entry)


def _at(tree, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def collate_jobs(jobs: list[ExportJob]) -> dict:
    """A batch as plain containers (Lightning rebuilds dataclasses when it moves a batch to the device)."""
    return {"prompts": [j.prompt for j in jobs], "seeds": [list(j.seeds) for j in jobs],
            "paths": [j.path for j in jobs], "sampling": dict(jobs[0].sampling)}
