"""A run stopped by SIGTERM (a scheduler's time limit or preemption) saves the last finished step, exits with status
143 instead of 0, and `--ckpt_path last` continues exactly where it stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from t2i_align.callbacks.checkpoint import SIGTERM_EXIT_CODE
from t2i_align.cli import main as cli_main
from tests.helpers import REPO_ROOT, tiny_fit_args

CONFIGS = Path(REPO_ROOT) / "configs"


def sigterm_args(tiny_sd, tiny_pairs, root: Path, max_steps: int, sigterm_at: int | None,
                 in_validation: bool = False) -> list[str]:
    """A tiny CSV-logged Finetune fit that checkpoints every 10 steps (so only SIGTERM saves the early steps),
    records its steps, and receives SIGTERM at the end of step ``sigterm_at``."""
    callbacks = [
        {"class_path": "t2i_align.callbacks.StepCheckpoint", "init_args": {"save_last": True, "every_n_train_steps": 10}},
        {"class_path": "tests.helpers.RecordSteps", "init_args": {"out_dir": str(root / "record")}},
    ]
    if sigterm_at is not None:
        callbacks.append({"class_path": "tests.helpers.SigtermAt",
                          "init_args": {"step": sigterm_at, "in_validation": in_validation}})
    root.mkdir(parents=True, exist_ok=True)
    (root / "trainer.yaml").write_text(yaml.safe_dump({"trainer": {
        "enable_progress_bar": False, "val_check_interval": 3, "num_sanity_val_steps": 0, "callbacks": callbacks}}))
    return [*tiny_fit_args(tiny_sd, tiny_pairs, root, max_steps, root / "trainer.yaml"),
            "--config", str(CONFIGS / "logger/csv.yaml"), f"--trainer.logger.init_args.save_dir={root}"]


@pytest.mark.parametrize("in_validation", [False, True], ids=["after a step", "during validation"])
def test_sigterm_saves_the_finished_step_exits_143_and_resumes_there(tiny_sd, tiny_pairs, tmp_path, in_validation):
    with pytest.raises(SystemExit) as stopped:
        cli_main(sigterm_args(tiny_sd, tiny_pairs, tmp_path, max_steps=6, sigterm_at=3, in_validation=in_validation))
    assert stopped.value.code == SIGTERM_EXIT_CODE
    [saved] = tmp_path.rglob("*.ckpt")
    assert saved.name == "sigterm-step=3.ckpt" and saved.parent.name == "checkpoints"
    state = torch.load(saved, weights_only=True)
    assert state["global_step"] == 3
    record = tmp_path / "record" / "rank0.json"
    assert not record.exists()  # the run did not reach its end (RecordSteps writes at train end)

    cli_main(sigterm_args(tiny_sd, tiny_pairs, tmp_path, max_steps=6, sigterm_at=None) + ["--ckpt_path=last"])
    steps = json.loads(record.read_text())["steps"]
    assert [s["step"] for s in steps] == [4, 5, 6]  # continued after the saved step, nothing retrained


def test_the_command_exits_143_on_sigterm(tiny_sd, tiny_pairs, tmp_path):
    args = sigterm_args(tiny_sd, tiny_pairs, tmp_path, max_steps=6, sigterm_at=2)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "t2i_align.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == SIGTERM_EXIT_CODE, done.stderr[-2000:]
    assert "sigterm-step=2.ckpt" in done.stderr and "--ckpt_path last" in done.stderr
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["sigterm-step=2.ckpt"]
