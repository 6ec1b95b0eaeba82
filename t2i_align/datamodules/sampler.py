"""Samplers: an endless, resumable training stream counted in global samples, and an exact evaluation split.

Both subclass :class:`torch.utils.data.DistributedSampler` only so that Lightning leaves them in place: its
``_requires_distributed_sampler`` (lightning/pytorch/trainer/connectors/data_connector.py) skips loaders whose
sampler is already a ``DistributedSampler``. They never call ``super().__init__()`` (which needs a process
group) and set the attributes they need themselves.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DistributedSampler

__all__ = ["ShardSampler", "StreamSampler"]


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


class ShardSampler(DistributedSampler):
    """Finite evaluation split: rank ``r`` gets ``r, r+W, r+2W, ...`` of ``range(n)``.

    Every index is visited exactly once across ranks, without padding, so ranks may get different counts
    (possibly zero when ``n < W``).
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
        self.num_samples = len(range(rank, n, num_replicas))
        self.total_size = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """No-op: the split does not depend on the epoch."""
