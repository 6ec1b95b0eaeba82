"""What a resumed run records is what it runs (issue 24, case 1): a checkpoint of another configuration is
resumed only on purpose (``--ckpt_path fork:X.ckpt``), a fork's optimizer and schedule really take the configured
settings, and ``--ckpt_path last`` says when it passed over newer checkpoints of another configuration."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from t2i_align.cli import main as cli_main
from t2i_align.io import CheckpointError
from t2i_align.runs import CONFIG_KEY
from tests.test_runs import fit_args, recorded_steps

LR = "--model.init_args.optimizer.init_args.lr"
WD = "--model.init_args.optimizer.init_args.weight_decay"
GAMMA = "--model.init_args.lr_scheduler.init_args.gamma"
SCHEDULE = ["--model.init_args.lr_scheduler.class_path=torch.optim.lr_scheduler.ExponentialLR", f"{GAMMA}=0.5"]


class RecordOptimizer(L.Callback):
    """After every training step: the live optimizer's settings and Adam's own step count."""

    def __init__(self, out: str) -> None:
        self.out, self.steps = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        group = optimizer.param_groups[0]
        adam_step = float(optimizer.state[group["params"][0]]["step"])
        self.steps.append({"step": trainer.global_step, "lr": float(group["lr"]),
                           "weight_decay": float(group["weight_decay"]), "adam_step": adam_step})

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.out).write_text(json.dumps(self.steps))


def record_optimizer(path: Path) -> list[str]:
    return ["--trainer.callbacks+=tests.test_resume_truth.RecordOptimizer", f"--trainer.callbacks.out={path}"]


def test_a_checkpoint_of_another_configuration_is_resumed_only_as_a_fork_that_runs_the_configured_settings(
        tiny_sd, tiny_pairs, tmp_path):
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=2, extra=[*SCHEDULE, *record_optimizer(tmp_path / "opt.json")]))
    live = json.loads((tmp_path / "opt.json").read_text())  # the schedule: lr * gamma ** step after each step
    assert [(s["step"], s["lr"]) for s in live] == [(1, pytest.approx(1e-4 * 0.5)), (2, pytest.approx(1e-4 * 0.25))]
    runs = tmp_path / "t2i-align"
    ckpt = runs / "version_0" / "checkpoints" / "last.ckpt"
    new = [*SCHEDULE, f"{LR}=0.5", f"{WD}=0.3", f"{GAMMA}=0.9"]

    # a plain path to a checkpoint of other settings: refused, naming the keys and the deliberate way
    with pytest.raises(CheckpointError) as info:
        cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=4, extra=[*new, f"--ckpt_path={ckpt}"]))
    message = str(info.value)
    assert "\n" not in message and str(ckpt) in message
    for key in ("model.init_args.optimizer.init_args.lr", "model.init_args.optimizer.init_args.weight_decay",
                "model.init_args.lr_scheduler.init_args.gamma"):
        assert key in message
    assert f"--ckpt_path fork:{ckpt}" in message
    # a fork keeps the checkpoint's data stream: another data seed would be recorded but not run
    with pytest.raises(CheckpointError, match=r"a fork continues the checkpoint's data stream, its data\.init_args\.seed"):
        cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=4,
                          extra=[*new, "--data.init_args.seed=1", f"--ckpt_path=fork:{ckpt}"]))
    assert sorted(p.name for p in runs.iterdir()) == ["version_0"]  # refused before anything was written

    # the fork continues from step 2 (Adam's moments and step count) with the configured settings
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=4,
                      extra=[*new, *record_optimizer(tmp_path / "opt.json"), f"--ckpt_path=fork:{ckpt}"]))
    assert recorded_steps(tmp_path) == [3, 4]
    live = json.loads((tmp_path / "opt.json").read_text())
    assert [s["adam_step"] for s in live] == [3.0, 4.0]
    for s in live:  # the optimizer itself holds the configured lr (on the configured schedule) and weight decay
        assert s["lr"] == pytest.approx(0.5 * 0.9 ** s["step"], rel=1e-6) and s["weight_decay"] == 0.3
    fork = runs / "version_1"
    config = yaml.safe_load((fork / "config.yaml").read_text())
    assert config["ckpt_path"] == f"fork:{ckpt}"
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.5
    saved = torch.load(fork / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert saved[CONFIG_KEY]["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.5
    group = saved["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 0.5 and group["weight_decay"] == 0.3
    assert group["lr"] == pytest.approx(0.5 * 0.9 ** 4, rel=1e-6)


def test_last_says_which_newer_checkpoints_of_another_configuration_it_passed_over(tiny_sd, tiny_pairs, tmp_path):
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=2))  # version_0: the original settings
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=4, extra=[f"{LR}=0.5"]))  # version_1: newer, other lr
    newer = tmp_path / "t2i-align" / "version_1" / "checkpoints"

    # nothing of a third configuration: the refusal points at a deliberate fork, never at a plain .ckpt path
    with pytest.raises(CheckpointError) as info:
        cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=4, extra=[f"{LR}=0.7", "--ckpt_path=last"]))
    message = str(info.value)
    assert "--ckpt_path fork:" in message and str(newer) in message and "give a .ckpt path" not in message

    # the original settings resume their own step 2 and say that newer checkpoints were passed over
    with pytest.warns(UserWarning) as caught:
        cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=3, extra=["--ckpt_path=last"]))
    assert recorded_steps(tmp_path) == [3]
    lines = [str(w.message) for w in caught if "passed over" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0], [str(w.message) for w in caught]
    assert str(tmp_path / "t2i-align" / "version_0" / "checkpoints" / "last.ckpt") in lines[0]
    assert str(newer / "last.ckpt") in lines[0] and "model.init_args.optimizer.init_args.lr" in lines[0]
