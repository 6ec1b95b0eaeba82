"""Samplers: an endless, resumable training stream counted in global samples, and an evaluation split that
gives every rank the same number of items (short ranks padded with marked repeats).

Both subclass :class:`torch.utils.data.DistributedSampler` only so that Lightning leaves them in place: its
``_requires_distributed_sampler`` (lightning/pytorch/trainer/connectors/data_connector.py) skips loaders whose
sampler is already a ``DistributedSampler``. They never call ``super().__init__()`` (which needs a process
group) and set the attributes they need themselves.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["PaddedCollate", "PaddedDataset", "PaddingIndex", "ShardSampler", "StreamSampler", "real_rows"]


def _check_rank(num_replicas: int, rank: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=} {rank=}")


class StreamSampler(DistributedSampler):
    """Endless deterministic index stream shared by all ranks, resumable at any global sample.

    The *global stream* is the concatenation of epoch orders ``order(0), order(1), ...``, each of ``n``
    indices: a permutation seeded with ``seed + epoch`` (as torch's DistributedSampler seeds), ``range(n)``
    when ``shuffle=False``, or ``n`` weighted draws with replacement when ``weights`` are given.

    Global step ``g`` (counted from the current position ``pos``) covers stream positions
    ``[pos + g*W*B, pos + (g+1)*W*B)``; rank ``r`` yields the block ``[r*B, (r+1)*B)`` of that window. So the
    ranks' batches of one step, concatenated in rank order, are the next ``W*B`` samples of the stream, and
    windows may straddle epochs.

    The position is ``(epoch, consumed)``; ``consumed`` counts global samples already *trained on* in that
    epoch and only moves through :meth:`advance` (DataLoader workers prefetch, so yielding proves nothing).
    Because the state is in global samples, a run may resume with another world size or batch size.
    ``__len__`` raises ``TypeError`` so Lightning treats the loader as infinite; bound training by max_steps.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        weights: Sequence[float] | torch.Tensor | None = None,
    ) -> None:  # deliberately no super().__init__(): it requires an initialised process group
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n=} {batch_size=}")
        _check_rank(num_replicas, rank)
        self.n = n
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = False
        self.weights: torch.Tensor | None = None
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float64)
            if w.shape != (n,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"weights must be {n} finite non-negative numbers with a positive sum")
            if not shuffle:
                raise ValueError(
                    "weighted sampling draws at random; it cannot be combined with shuffle=False"
                )
            self.weights = w
        self.epoch = 0
        self.consumed = 0

    def epoch_order(self, epoch: int) -> list[int]:
        """The ``n`` indices of data epoch ``epoch`` in stream order."""
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, pos = self.epoch, self.consumed  # snapshot: later advance() calls do not move this iterator
        window, offset = self.num_replicas * self.batch_size, self.rank * self.batch_size
        cached_epoch, order = -1, []
        step = 0
        while True:
            start = pos + step * window + offset
            for q in range(start, start + self.batch_size):
                e = epoch + q // self.n
                if e != cached_epoch:
                    cached_epoch, order = e, self.epoch_order(e)
                yield order[q % self.n]
            step += 1

    def __len__(self) -> int:
        # Lightning's sized_len() catches TypeError and then treats the DataLoader as infinite.
        raise TypeError("endless stream")

    def advance(self, num_global_samples: int) -> None:
        """Mark ``num_global_samples`` more samples (all ranks together) as trained on."""
        if num_global_samples < 0:
            raise ValueError(f"cannot advance by a negative count ({num_global_samples})")
        total = self.consumed + num_global_samples
        self.epoch += total // self.n
        self.consumed = total % self.n

    def set_epoch(self, epoch: int) -> None:
        """No-op. Lightning calls this with *its* epoch, which stays 0 for an infinite loader and is unrelated
        to this stream's data epoch; the stream position is owned by :meth:`advance` and
        :meth:`load_state_dict`."""

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "consumed", "seed", "n"}`` (``n`` only for a sanity check on resume)."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved stream (adopts the saved seed, so the continuation is exact)."""
        if int(state["seed"]) != self.seed:
            warnings.warn(
                f"StreamSampler: resuming with the checkpoint's seed {state['seed']} "
                f"(configured {self.seed})",
                stacklevel=2,
            )
        if "n" in state and int(state["n"]) != self.n:
            warnings.warn(
                f"StreamSampler: dataset size changed from {state['n']} to {self.n}; the resumed stream "
                "is not a continuation of the saved one",
                stacklevel=2,
            )
        self.seed = int(state["seed"])
        self.epoch, self.consumed = int(state["epoch"]), 0
        self.advance(int(state["consumed"]))


class PaddingIndex(int):
    """A dataset index that :class:`ShardSampler` yields for a *repeated* item (padding): an ``int`` for the
    dataset, told apart by its type. Pickles as itself, so the mark reaches DataLoader worker processes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"PaddingIndex({int(self)})"


class ShardSampler(DistributedSampler):
    """Finite evaluation split in which every rank gets the same number of items, at least one (when ``n >= 1``).

    Rank ``r`` of ``W`` takes the positions ``r, r+W, r+2W, ...`` of ``range(total_size)``, where ``total_size`` is
    ``n`` rounded up to a multiple of ``W`` (at least ``W``). Position ``p < n`` is index ``p``; a position past the
    end is a repeat of index ``p % n``, yielded as a :class:`PaddingIndex` (torch's ``DistributedSampler`` pads the
    same way, but without telling the repeats apart). So every index is visited exactly once as a real item; the
    repeats only give every rank work, and whatever consumes them must drop them: wrap the dataset in
    :class:`PaddedDataset` and the collate function in :class:`PaddedCollate`, and every batch carries
    ``batch["padding"]`` (a bool tensor, True for a repeat).

    Why every rank needs items: Lightning skips the evaluation / prediction loop of a rank whose loader is empty,
    end hooks included (``skip`` in lightning/pytorch/loops/evaluation_loop.py and prediction_loop.py), so the
    ranks that have items wait forever in the collective calls of those hooks (metric syncs, barriers). Equal
    counts keep the ranks' batches in step as well. ``n = 0`` gives every rank nothing (all skip alike).
    """

    def __init__(
        self, n: int, num_replicas: int = 1, rank: int = 0
    ) -> None:  # no super().__init__(), see above
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        _check_rank(num_replicas, rank)
        self.n = n
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = False
        self.drop_last = False
        self.seed = 0
        self.epoch = 0
        self.num_samples = -(-n // num_replicas) if n else 0  # ceil(n / W): >= 1 for every rank when n >= 1
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        for p in range(self.rank, self.total_size, self.num_replicas):
            yield p if p < self.n else PaddingIndex(p % self.n)

    def __len__(self) -> int:
        return self.num_samples

    @property
    def padding(self) -> list[bool]:
        """This rank's items in order: True for a repeat."""
        return [p >= self.n for p in range(self.rank, self.total_size, self.num_replicas)]

    def set_epoch(self, epoch: int) -> None:
        """No-op: the split does not depend on the epoch."""


class PaddedDataset(Dataset):
    """``dataset`` for a :class:`ShardSampler`: item ``i`` is ``(dataset[i], is_repeat)`` (see :class:`PaddedCollate`)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, bool]:
        return self.dataset[index], isinstance(index, PaddingIndex)


class PaddedCollate:
    """``collate`` for :class:`PaddedDataset` items: the batch dict of ``collate`` plus ``"padding"``, a bool
    tensor with one entry per item, True for a repeat that metrics and exports must ignore (a class, not a
    closure, so that DataLoader workers started by ``spawn`` can unpickle it)."""

    def __init__(self, collate: Callable[[list], dict]) -> None:
        self.collate = collate

    def __call__(self, items: Sequence[tuple[Any, bool]]) -> dict:
        batch = self.collate([item for item, _ in items])
        batch["padding"] = torch.tensor([bool(flag) for _, flag in items], dtype=torch.bool)
        return batch


def real_rows(batch: dict, size: int | None = None) -> list[int]:
    """Positions of the real (not repeated) rows of a batch with ``batch["padding"]``; every row without it.
    ``size``: the batch's length when it has no ``"padding"``."""
    padding = batch.get("padding")
    if padding is None:
        if size is None:
            raise ValueError("real_rows: a batch without 'padding' needs its size")
        return list(range(size))
    return [i for i, flag in enumerate(padding.tolist()) if not flag]
