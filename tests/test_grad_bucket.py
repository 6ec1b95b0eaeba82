"""The gradients of a network kept out of DDP (CoMat's discriminator, ``manual_step(..., sync=...)``) are averaged
over the ranks in one bucket: one ``all_reduce`` per dtype instead of one per tensor, with the per-tensor result.
Two gloo processes on the CPU."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.ddp

SHAPES = [(3, 5), (7,), (2, 3, 4), (1,), (16, 2)]
TIMEOUT_S = 120


def rank_grads(rank: int) -> list[torch.Tensor]:
    """This rank's gradients: float32 tensors and two float64 ones (two buckets), other values on each rank."""
    g = torch.Generator().manual_seed(100 + rank)
    grads = [torch.randn(shape, generator=g) for shape in SHAPES]
    grads += [torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)]
    return grads


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from t2i_align.lightning_modules.base import average_gradients

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
    try:
        per_tensor = [g.clone() for g in rank_grads(rank)]
        for grad in per_tensor:  # the former way: one collective per tensor
            dist.all_reduce(grad)
            grad /= world
        grads = rank_grads(rank)
        storage = [g.data_ptr() for g in grads]
        calls = []
        original = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            calls.append(tuple(tensor.shape))
            return original(tensor, *args, **kwargs)

        dist.all_reduce = counting
        try:
            average_gradients(grads)
        finally:
            dist.all_reduce = original
        torch.save({"per_tensor": per_tensor, "bucketed": grads, "calls": calls,
                    "in_place": [g.data_ptr() for g in grads] == storage}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_bucketed_average_equals_the_per_tensor_one_in_one_call_per_dtype(tmp_path):
    world = 2
    context = mp.start_processes(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the two gloo processes did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:  # only these two, on failure or timeout
            if process.is_alive():
                process.kill()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    expected_mean = [(a + b) / 2 for a, b in zip(rank_grads(0), rank_grads(1))]
    for result in results:
        assert result["in_place"]  # the gradients themselves were averaged (the optimizer reads them)
        assert result["calls"] == [(sum(torch.Size(s).numel() for s in SHAPES),), (16 + 3,)]  # one bucket per dtype
        for bucketed, per_tensor, mean in zip(result["bucketed"], result["per_tensor"], expected_mean):
            assert bucketed.dtype == per_tensor.dtype and bucketed.shape == per_tensor.shape
            torch.testing.assert_close(bucketed, per_tensor)
            torch.testing.assert_close(bucketed, mean)
    for a, b in zip(results[0]["bucketed"], results[1]["bucketed"]):
        assert torch.equal(a, b)  # every rank ends with the same gradients
