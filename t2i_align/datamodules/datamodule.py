"""LightningDataModule: endless, resumable training streams over prompts and/or image-caption pairs plus
validation splits that give every rank work (repeats marked in ``batch["padding"]``)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader

from .pairs import PairDataset, PairSource, collate_pairs
from .prompts import PromptDataset, PromptSource, collate_prompts, load_prompt_sources
from .sampler import PaddedCollate, PaddedDataset, ShardSampler, StreamSampler

__all__ = ["T2IDataModule", "check_for_generator"]


def warn_truncated_texts(tokenizer: Any, texts: Sequence[str], names: Sequence[str], dataset: str) -> int:
    """Warn once for ``dataset`` when texts are longer than the text encoder reads (they are truncated);
    returns how many are."""
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=False)["input_ids"]]
    long = [i for i, n in enumerate(lengths) if n > limit]
    if long:
        first = long[0]
        rank_zero_warn(
            f"{dataset}: {len(long)} of {len(texts)} texts are longer than the text encoder's {limit} tokens and are "
            f"truncated (the first: {names[first]}, {lengths[first]} tokens)"
        )
    return len(long)


def check_for_generator(trainer: Any, resolution: int | None, key: str, sets: Mapping[str, Any]) -> None:
    """Check data against the model being trained or sampled: ``resolution`` (config ``key``) must be a multiple
    of the VAE's downsampling factor; over-long texts are counted and warned about once per set.

    ``sets``: name -> PairDataset | PromptDataset | list of prompts. Does nothing without a model that has a
    ``generator`` (the datamodule used on its own)."""
    generator = getattr(getattr(trainer, "lightning_module", None), "generator", None)
    if generator is None:
        return
    if resolution is not None:
        generator.check_resolution(resolution, key)
    for name, data in sets.items():
        if hasattr(data, "records"):  # image-caption pairs
            texts, names = [r.caption for r in data.records], [r.where or r.id for r in data.records]
        else:
            prompts = getattr(data, "prompts", data)
            texts, names = [p.text for p in prompts], [f"{p.source}: id {p.id}" for p in prompts]
        warn_truncated_texts(generator.tokenizer, texts, names, name)


def _as_prompt_sources(value: Sequence[PromptSource | Mapping[str, Any]] | None) -> list[PromptSource] | None:
    if value is None:
        return None
    return [v if isinstance(v, PromptSource) else PromptSource(**v) for v in value]


def _as_pair_source(value: PairSource | Mapping[str, Any] | None) -> PairSource | None:
    return value if value is None or isinstance(value, PairSource) else PairSource(**value)


class T2IDataModule(L.LightningDataModule):
    """Prompts and/or image-caption pairs for text-to-image fine-tuning.

    A training batch always has one shape: ``{"prompts": <prompt batch>, "pairs": <pair batch>}`` with the parts
    that are configured, where a prompt batch is ``{"prompts": [str], "ids": [str], "sources": [str]}`` and a pair
    batch ``{"pixel_values": FloatTensor[B, 3, R, R] in [0, 1], "captions": [str], "ids": [str],
    "masks": [[(noun, BoolTensor[R, R] | None)] | None] | None}`` (methods read them with
    :func:`~t2i_align.lightning_modules.base.batch_prompts` / ``batch_pairs``). Each training loader is an endless :class:`StreamSampler` stream; bound training
    with ``max_steps`` and validate with an integer ``val_check_interval`` (plus
    ``check_val_every_n_epoch=None``), since the single Lightning epoch never ends. A validation batch is one prompt
    or pair batch plus ``"padding"`` (BoolTensor[B], True for a repeat that only gives a rank work: skip it; see
    :meth:`val_dataloader`).

    The LightningModule must call :meth:`advance` once per training batch (see there for *where*). The
    stream positions are saved by Lightning through :meth:`state_dict` and restored through
    :meth:`load_state_dict` (lightning/pytorch/trainer/connectors/checkpoint_connector.py,
    ``_CheckpointConnector.restore_datamodule``, run from ``Trainer._run`` after ``setup`` and before the
    dataloaders are requested); the state is kept until the samplers exist, so either order works.

    Args:
        train_prompts: prompt sets to train on, mixed so that each set's share of draws is proportional to its
            ``weight`` (regardless of its size).
        train_pairs: image-caption(-mask) pairs to train on.
        val_prompts: prompt sets for validation (concatenated in order; weights ignored).
        val_pairs: image-caption pairs for validation.
        batch_size: per-process batch size, for the prompt and the pair loader alike.
        val_batch_size: per-process validation batch size (default: ``batch_size``).
        resolution: side of the square training/validation images.
        num_workers: DataLoader worker processes per loader (workers persist when > 0).
        seed: seed of the training streams (the pair stream uses ``seed + 1``).
        shuffle: shuffle the training streams; ``False`` streams the (single) prompt set / pair set in file
            order (not allowed with several weighted prompt sets).
        val_limit: keep only the first ``val_limit`` items of each validation loader.
    """

    def __init__(
        self,
        train_prompts: list[PromptSource] | None = None,
        train_pairs: PairSource | None = None,
        val_prompts: list[PromptSource] | None = None,
        val_pairs: PairSource | None = None,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        resolution: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        val_limit: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size=} {val_batch_size=}")
        if val_limit is not None and val_limit < 1:
            raise ValueError(f"val_limit must be >= 1, got {val_limit}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 loads in the main process), got {num_workers}")
        self.train_prompts = _as_prompt_sources(train_prompts)
        self.train_pairs = _as_pair_source(train_pairs)
        self.val_prompts = _as_prompt_sources(val_prompts)
        self.val_pairs = _as_pair_source(val_pairs)
        if self.train_prompts is not None and len(self.train_prompts) > 1 and not shuffle:
            raise ValueError("shuffle=False cannot honour the weights of several train prompt sources")
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.resolution = resolution
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.val_limit = val_limit
        self.world_size, self.rank = 1, 0
        self._train_sets: dict[str, Any] | None = None  # "prompts" -> (dataset, weights), "pairs" -> dataset
        self._val_sets: dict[str, Any] | None = None
        self._samplers: dict[str, StreamSampler] | None = None
        self._pending_state: dict[str, Any] = {}
        self._checked = False  # resolution and text lengths checked against the model (once)

    # ---------------------------------------------------------------------------------------------- setup

    def setup(self, stage: str | None = None) -> None:
        """Read the configured sets (once) and take world size / rank from the trainer (1 / 0 without one)."""
        trainer = self.trainer
        self.world_size, self.rank = (
            (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        )
        if stage in (None, "fit") and self._train_sets is None:
            sets: dict[str, Any] = {}
            if self.train_prompts:
                prompts, weights = load_prompt_sources(self.train_prompts)
                sets["prompts"] = (PromptDataset(prompts), weights if len(self.train_prompts) > 1 else None)
            if self.train_pairs is not None:
                sets["pairs"] = PairDataset.from_source(self.train_pairs, self.resolution, self.seed)
            self._train_sets = sets
        if stage in (None, "fit", "validate") and self._val_sets is None:
            sets = {}
            if self.val_prompts:
                sets["prompts"] = PromptDataset(load_prompt_sources(self.val_prompts)[0])
            if self.val_pairs is not None:
                src = self.val_pairs
                sets["pairs"] = PairDataset(
                    src.path, src.image_root, src.format, self.resolution, src.per, src.limit
                )
            self._val_sets = sets
        if not self._checked:
            self._checked = True
            named = {f"train {k} ({self._describe(k, 'train')})": v[0] if k == "prompts" else v
                     for k, v in (self._train_sets or {}).items()}
            named |= {f"val {k} ({self._describe(k, 'val')})": v for k, v in (self._val_sets or {}).items()}
            check_for_generator(trainer, self.resolution, "data.init_args.resolution", named)

    def _describe(self, kind: str, split: str) -> str:
        if kind == "pairs":
            return str((self.train_pairs if split == "train" else self.val_pairs).path)
        return ", ".join(str(s.path) for s in (self.train_prompts if split == "train" else self.val_prompts) or [])

    # ---------------------------------------------------------------------------------------------- loaders

    def _loader(self, dataset: Any, sampler: Any, batch_size: int, kind: str, padded: bool = False) -> DataLoader:
        collate = collate_prompts if kind == "prompts" else collate_pairs
        return DataLoader(
            PaddedDataset(dataset) if padded else dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=PaddedCollate(collate) if padded else collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> CombinedLoader:
        """A ``CombinedLoader`` over the endless loaders by name (``"prompts"`` and/or ``"pairs"``)."""
        if self._train_sets is None:
            self.setup("fit")
        assert self._train_sets is not None
        if not self._train_sets:
            raise RuntimeError("T2IDataModule: no training data configured (train_prompts / train_pairs)")
        # Carry the position over if loaders are rebuilt (e.g. reload_dataloaders_every_n_epochs).
        state = self.state_dict()
        self._samplers, loaders = {}, {}
        for kind, item in self._train_sets.items():
            dataset, weights = item if kind == "prompts" else (item, None)
            seed = self.seed if kind == "prompts" else self.seed + 1
            sampler = StreamSampler(
                len(dataset), self.batch_size, self.world_size, self.rank, seed, self.shuffle, weights
            )
            self._samplers[kind] = sampler
            loaders[kind] = self._loader(dataset, sampler, self.batch_size, kind)
        self._pending_state = {}
        self._apply_state(state)
        return CombinedLoader(loaders, mode="max_size_cycle")

    @property
    def val_loader_names(self) -> list[str]:
        """Kinds of the validation loaders in ``dataloader_idx`` order (``"prompts"`` before ``"pairs"``)."""
        if self._val_sets is None:
            self.setup("validate")
        assert self._val_sets is not None
        return list(self._val_sets)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation loaders split by :class:`ShardSampler`: one loader, a list ``[prompts, pairs]`` (see
        :attr:`val_loader_names`), or ``[]`` when nothing is configured.

        Every rank gets the same number of items, at least one, also from a set smaller than the world size
        (Lightning would skip the validation of a rank without any, and the others would wait for it in the
        epoch-end syncs). The short ranks repeat items; every batch has ``"padding"``, a bool tensor that is True
        for a repeat, which metrics must drop (each item then counts once, as in one process)."""
        loaders = []
        for kind in self.val_loader_names:
            dataset = self._val_sets[kind]  # type: ignore[index]
            n = len(dataset) if self.val_limit is None else min(len(dataset), self.val_limit)
            sampler = ShardSampler(n, self.world_size, self.rank)
            loaders.append(self._loader(dataset, sampler, self.val_batch_size, kind, padded=True))
        return loaders[0] if len(loaders) == 1 else loaders

    # ---------------------------------------------------------------------------------------------- state

    def advance(self, global_batch_size: int | None = None) -> None:
        """Mark one training batch per loader as consumed by all ranks (default ``batch_size * world_size``).

        Call it once per training batch from the LightningModule **before** checkpoints of that step are
        written: ``on_train_batch_start`` or the end of ``training_step``. Lightning runs callbacks'
        ``on_train_batch_end`` (incl. ``ModelCheckpoint(every_n_train_steps=...)``) *before* the module's
        ``on_train_batch_end`` (lightning/pytorch/loops/training_epoch_loop.py, ``advance``), so advancing
        there saves a position one batch behind and the resumed run repeats that batch.
        """
        if self._samplers is None:
            raise RuntimeError("T2IDataModule.advance() called before train_dataloader()")
        count = self.batch_size * self.world_size if global_batch_size is None else global_batch_size
        for sampler in self._samplers.values():
            sampler.advance(count)

    def state_dict(self) -> dict[str, Any]:
        """``{"prompts": sampler_state, "pairs": sampler_state}`` for the configured training loaders."""
        if self._samplers is None:
            return dict(self._pending_state)
        return {kind: sampler.state_dict() for kind, sampler in self._samplers.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stream positions now, or when the training loaders are created."""
        if self._samplers is None:
            self._pending_state = dict(state_dict)
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        assert self._samplers is not None
        for kind, sampler_state in state.items():
            if kind in self._samplers:
                self._samplers[kind].load_state_dict(sampler_state)
            else:
                warnings.warn(
                    f"T2IDataModule: checkpoint has a {kind!r} stream but no such loader is configured",
                    stacklevel=2,
                )
