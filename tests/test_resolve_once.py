"""``--ckpt_path last`` on a multi-node run is resolved once, on global rank 0, and shared: two gloo processes
started "by the cluster" (torchrun's environment variables) whose own answers differ resume rank 0's."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.ddp

WORKER = textwrap.dedent('''
    import json, os, sys
    import lightning as L
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel
    from t2i_align.runs import resolve_once

    rank, out, fail = int(os.environ["RANK"]), sys.argv[1], sys.argv[2] == "fail"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    calls = []

    def resolve():  # each rank's own view of the folder (a different newest file on each node)
        calls.append(rank)
        if fail:
            raise ValueError(f"no checkpoint (rank {rank})")
        return f"checkpoints/seen-by-rank-{rank}.ckpt"

    try:
        row = {"path": resolve_once(trainer, resolve)}
    except ValueError as e:
        row = {"error": str(e)}
    row["calls"] = calls
    if not fail:
        trainer.fit(BoringModel())  # Lightning's own set-up after the early one: the same process group
        row["fitted_steps"] = trainer.global_step
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(row, f)
    if torch.distributed.is_initialized():  # a clean exit for both ranks (gloo's teardown can race otherwise)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(tmp_path, mode: str) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "2",
               "TORCHELASTIC_RUN_ID": "test", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_every_rank_resumes_rank_zeros_choice(tmp_path):
    rows = run_pair(tmp_path, "ok")
    assert [r["path"] for r in rows] == ["checkpoints/seen-by-rank-0.ckpt"] * 2
    assert rows[0]["calls"] == [0] and rows[1]["calls"] == []  # resolved once: rank 1 reads no checkpoint
    assert [r["fitted_steps"] for r in rows] == [2, 2]


def test_rank_zeros_refusal_stops_every_rank(tmp_path):
    rows = run_pair(tmp_path, "fail")
    assert [r["error"] for r in rows] == ["no checkpoint (rank 0)"] * 2
