"""Two CPU processes (gloo DDP) through the CLI: identical weights, disjoint data, no hang."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT
from tests.training.test_finetune_cli import fit_args

pytestmark = pytest.mark.ddp


def run_cli(args: list[str], timeout: int = 400) -> None:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "t2i_align.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_two_process_ddp_training(tiny_sd, tiny_pairs, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    # 16 pairs, 2 per process: one pass over the data in 4 steps; 5 validation pairs split 3 / 2.
    common = ["--data.init_args.val_pairs.limit=5"]
    run_cli(fit_args(tiny_sd, tiny_pairs, ddp, max_steps=4, every=2, extra=[
        *common, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.val_check_interval=2"]))
    run_cli(fit_args(tiny_sd, tiny_pairs, single, max_steps=4, every=2, extra=[
        *common, "--data.init_args.batch_size=4", "--trainer.val_check_interval=2"]))

    ranks = [json.loads((ddp / "record" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    steps0, steps1 = ranks[0]["steps"], ranks[1]["steps"]
    assert len(steps0) == len(steps1) == 4
    for a, b in zip(steps0, steps1):
        assert a["digest"] == b["digest"], f"ranks diverged at step {a['step']}"
        assert not set(a["ids"]) & set(b["ids"]), "ranks saw the same sample in one step"
    assert len({s["digest"] for s in steps0}) == 4  # the weights did change every step
    seen = [i for a, b in zip(steps0, steps1) for i in a["ids"] + b["ids"]]
    assert sorted(seen, key=int) == [str(i) for i in range(16)]  # one full pass, no repeat, no skip
    # the global stream does not depend on the number of processes
    single_steps = json.loads((single / "record" / "rank0.json").read_text())["steps"]
    assert [s["ids"] for s in single_steps] == [a["ids"] + b["ids"] for a, b in zip(steps0, steps1)]

    # validation ran on both ranks (uneven split) and the checkpoints were written
    assert ranks[0]["validations"] == ranks[1]["validations"] == 2
    ckpt = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["T2IDataModule"]["pairs"]["epoch"] == 1 and ckpt["T2IDataModule"]["pairs"]["consumed"] == 0
    assert Path(ddp / "lora" / "pytorch_lora_weights.safetensors").exists()
