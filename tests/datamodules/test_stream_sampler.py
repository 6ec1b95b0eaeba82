"""StreamSampler / ShardSampler guarantees, simulated with several ranks in one process (no DDP)."""

from __future__ import annotations

import itertools

import pytest
import torch
from lightning.fabric.utilities.data import sized_len
from torch.utils.data import DataLoader, DistributedSampler

from t2i_align.datamodules import PaddingIndex, ShardSampler, StreamSampler


def reference_stream(n: int, seed: int, length: int, shuffle: bool = True, weights=None) -> list[int]:
    """The documented global stream, built independently: epoch e uses a generator seeded with seed + e."""
    out: list[int] = []
    for epoch in itertools.count():
        if len(out) >= length:
            return out[:length]
        g = torch.Generator().manual_seed(seed + epoch)
        if weights is not None:
            out += torch.multinomial(
                torch.tensor(weights, dtype=torch.float64), n, True, generator=g
            ).tolist()
        else:
            out += torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
    raise AssertionError


def train(samplers: list[StreamSampler], steps: int, iterators=None) -> list[int]:
    """Simulate ``steps`` training steps: every rank takes one batch, then every rank advances by W*B."""
    iterators = iterators or [iter(s) for s in samplers]
    out: list[int] = []
    for _ in range(steps):
        for s, it in zip(samplers, iterators, strict=True):
            out += [next(it) for _ in range(s.batch_size)]
        for s in samplers:
            s.advance(s.num_replicas * s.batch_size)
    return out


def ranks(n: int, world: int, batch: int, seed: int = 5, **kw) -> list[StreamSampler]:
    return [StreamSampler(n, batch, world, r, seed, **kw) for r in range(world)]


@pytest.mark.parametrize(("n", "world", "batch"), [(7, 3, 2), (10, 1, 4), (5, 2, 3), (100, 4, 8)])
def test_ranks_together_form_the_global_stream(n: int, world: int, batch: int) -> None:
    steps = 11
    assert train(ranks(n, world, batch), steps) == reference_stream(n, 5, steps * world * batch)


def test_each_epoch_is_a_permutation_and_epochs_differ() -> None:
    stream = reference_stream(50, 0, 150)
    sampler_stream = list(itertools.islice(iter(StreamSampler(50, 10)), 150))
    assert sampler_stream == reference_stream(50, 0, 150)
    assert all(sorted(stream[i : i + 50]) == list(range(50)) for i in (0, 50, 100))
    assert stream[:50] != stream[50:100]


@pytest.mark.parametrize(("w1", "b1", "w2", "b2"), [(3, 2, 2, 3), (3, 2, 4, 5), (1, 8, 2, 1), (2, 4, 3, 3)])
def test_resume_with_other_world_and_batch_size_continues_the_stream(
    w1: int, b1: int, w2: int, b2: int
) -> None:
    n, k1, k2 = 13, 5, 7
    before = ranks(n, w1, b1)
    first = train(before, k1)
    state = before[0].state_dict()
    assert all(s.state_dict() == state for s in before)
    assert state == {"epoch": (k1 * w1 * b1) // n, "consumed": (k1 * w1 * b1) % n, "seed": 5, "n": n}
    after = ranks(n, w2, b2, seed=999)  # the checkpoint's seed wins
    for s in after:
        with pytest.warns(UserWarning, match="checkpoint's seed 5"):
            s.load_state_dict(state)
    second = train(after, k2)
    assert first + second == reference_stream(n, 5, k1 * w1 * b1 + k2 * w2 * b2)


def test_prefetch_does_not_move_the_position() -> None:
    sampler = StreamSampler(9, 2, 1, 0, seed=1)
    ahead = list(itertools.islice(iter(sampler), 40))  # workers prefetching far ahead
    assert sampler.state_dict()["consumed"] == 0 and sampler.state_dict()["epoch"] == 0
    assert list(itertools.islice(iter(sampler), 40)) == ahead
    sampler.advance(4)
    assert list(itertools.islice(iter(sampler), 10)) == ahead[4:14]


def test_persistent_iterator_with_advance_equals_fresh_iterators() -> None:
    a, b = ranks(11, 2, 3), ranks(11, 2, 3)
    persistent = train(a, 6)
    fresh: list[int] = []
    for _ in range(6):  # a new iterator per step (e.g. loader re-created) starts where training stopped
        fresh += train(b, 1)
    assert persistent == fresh


def test_advance_rolls_epochs_and_roundtrip() -> None:
    s = StreamSampler(10, 4)
    s.advance(23)
    assert (s.epoch, s.consumed) == (2, 3)
    t = StreamSampler(10, 1)
    t.load_state_dict(s.state_dict())
    assert list(itertools.islice(iter(t), 5)) == reference_stream(10, 0, 28)[23:]
    with pytest.raises(ValueError):
        s.advance(-1)
    with pytest.warns(UserWarning, match="dataset size changed"):
        StreamSampler(12, 1).load_state_dict(s.state_dict())


def test_unshuffled_stream() -> None:
    s = StreamSampler(4, 3, shuffle=False)
    assert list(itertools.islice(iter(s), 10)) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_weighted_stream() -> None:
    weights = [0.0, 1.0, 3.0, 0.0]
    samplers = ranks(4, 2, 3, weights=weights)
    stream = train(samplers, 50)
    assert stream == reference_stream(4, 5, 300, weights=weights)
    counts = torch.bincount(torch.tensor(stream), minlength=4).tolist()
    assert counts[0] == counts[3] == 0 and counts[2] / counts[1] == pytest.approx(3, rel=0.25)
    with pytest.raises(ValueError, match="shuffle=False"):
        StreamSampler(4, 1, weights=weights, shuffle=False)
    with pytest.raises(ValueError, match="non-negative"):
        StreamSampler(4, 1, weights=[1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="4 finite"):
        StreamSampler(4, 1, weights=[1.0, 1.0])


def test_lightning_sees_an_infinite_distributed_sampler() -> None:
    s = StreamSampler(10, 2, 2, 1)
    assert isinstance(s, DistributedSampler)
    with pytest.raises(TypeError, match="endless stream"):
        len(s)
    loader = DataLoader(list(range(100, 110)), batch_size=2, sampler=s)
    assert sized_len(loader) is None  # what Lightning uses to decide a loader is infinite
    s.set_epoch(7)  # no-op
    assert s.state_dict()["epoch"] == 0
    batches = list(itertools.islice(iter(loader), 3))
    expected = reference_stream(10, 0, 12)
    assert [b.tolist() for b in batches] == [
        [100 + i for i in expected[w * 4 + 2 : w * 4 + 4]] for w in range(3)
    ]


def test_invalid_arguments() -> None:
    for kwargs in (
        {"n": 0, "batch_size": 1},
        {"n": 3, "batch_size": 0},
        {"n": 3, "batch_size": 1, "rank": 2, "num_replicas": 2},
    ):
        with pytest.raises(ValueError):
            StreamSampler(**kwargs)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_sampler_covers_every_index_once(n: int, world: int) -> None:
    shards = [ShardSampler(n, world, r) for r in range(world)]
    parts = [list(s) for s in shards]
    real = [[i for i in p if not isinstance(i, PaddingIndex)] for p in parts]
    assert sorted(itertools.chain.from_iterable(real)) == list(range(n))  # each index once as a real item
    assert [len(s) for s in shards] == [len(p) for p in parts]
    assert real[0] == list(range(0, n, world))
    assert len({len(p) for p in parts}) == 1  # as many on every rank (repeats included) ...
    assert all(len(p) >= 1 for p in parts) if n else all(not p for p in parts)  # ... at least one when n >= 1
    assert sum(map(len, parts)) - n < world  # no more repeats than needed
    assert [[isinstance(i, PaddingIndex) for i in p] for p in parts] == [s.padding for s in shards]
    assert all(isinstance(s, DistributedSampler) for s in shards)
