"""W&B logging, offline: the resolved config and the metrics land in the run's folder, and fits started
one after another in the same working directory (as sweep trials are) each get their own run."""

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
import yaml
from wandb.sdk.lib.filenames import is_wandb_file

from t2i_align.cli import RunConfigCallback
from t2i_align.cli import main as cli_main
from tests.test_configs import BASE, config_args

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

LRS = [1e-4, 3e-4]  # one fit per value, like two sweep trials
FAST = {  # 2 steps, one 2-sample validation, no checkpoints
    "trainer": {
        "max_steps": 2,
        "val_check_interval": 2,
        "log_every_n_steps": 1,
        "callbacks": [],
        "enable_checkpointing": False,
        "enable_progress_bar": False,
    }
}


def wandb_fit(tiny_sd: str, tiny_pairs: str, work: Path, lr: float) -> Path:
    """A tiny fit logged to W&B under `work`; returns the offline run folder it created."""
    fast = work / "fast.yaml"
    fast.write_text(yaml.safe_dump(FAST))
    before = set(work.glob("wandb/offline-run-*"))
    try:
        cli_main([
            "fit", *config_args(*BASE, "logger/wandb.yaml"), "--config", str(fast),
            f"--trainer.logger.init_args.save_dir={work}",
            f"--model.init_args.generator.pretrained={tiny_sd}",
            f"--model.init_args.optimizer.init_args.lr={lr}",
            f"--data.init_args.train_pairs.path={tiny_pairs}",
            f"--data.init_args.val_pairs.path={tiny_pairs}",
            "--data.init_args.val_pairs.limit=2",
            "--data.init_args.batch_size=2",
        ])
    finally:
        wandb.finish()  # what the end of a trial's process does
    (run_dir,) = set(work.glob("wandb/offline-run-*")) - before
    return run_dir


@functools.cache
def read_run(run_dir: Path) -> dict:
    """W&B's own record of the run (state, config, summary), read from its .wandb log by wandb's reader."""
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, check=True,
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def runs(tiny_sd, tiny_pairs, tmp_path_factory) -> tuple[Path, list[Path]]:
    """Two fits in the same working directory and save_dir: (working directory, their run folders)."""
    work = tmp_path_factory.mktemp("wandb_work")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("WANDB_MODE", "offline")
        return work, [wandb_fit(tiny_sd, tiny_pairs, work, lr) for lr in LRS]


def test_each_fit_gets_its_own_run_and_leaves_the_working_directory_alone(runs):
    work, run_dirs = runs
    assert len(set(run_dirs)) == 2
    assert len({read_run(d)["run_id"] for d in run_dirs}) == 2
    assert not (work / "config.yaml").exists()  # Lightning's SaveConfigCallback would put it here


def test_resolved_config_lands_in_the_run_folder(runs, tiny_sd, capsys):
    _, run_dirs = runs
    for run_dir, lr in zip(run_dirs, LRS):
        saved = run_dir / "files" / RunConfigCallback.wandb_config_filename
        config = yaml.safe_load(saved.read_text())
        assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == lr
        assert config["model"]["init_args"]["generator"]["pretrained"] == tiny_sd
        assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
        assert config["model"]["init_args"]["seed"] == 0  # resolved: defaults included
        # W&B rewrites its own files (config.yaml among them) when a run finishes online or is synced
        assert not is_wandb_file(saved.name)
        # the saved file is a complete config for the CLI
        with pytest.raises(SystemExit):
            cli_main(["fit", "--config", str(saved), "--print_config"])
        assert yaml.safe_load(capsys.readouterr().out) == config
        # and W&B's config record holds the same resolved config
        recorded = read_run(run_dir)["config"]
        assert recorded["model"]["init_args"]["optimizer"]["init_args"]["lr"] == lr
        assert recorded["data"]["init_args"]["batch_size"] == 2


def test_metrics_land_in_the_run_record(runs):
    _, run_dirs = runs
    for run_dir in run_dirs:
        record = read_run(run_dir)
        assert record["state"] == "finished" and record["exit_code"] == 0
        summary = record["summary"]
        for key in ("train/loss", "val/denoise_loss"):  # val/denoise_loss: the sweeps' metric
            assert math.isfinite(summary[key]) and summary[key] > 0


def test_a_resumed_fit_continues_its_wandb_run(tiny_sd, tiny_pairs, tmp_path):
    """A requeued or hand-resumed fit (``--ckpt_path last``) logs to the W&B run its checkpoint was logged to and
    saves into that run's folder, instead of opening a new run each time."""
    def fit(max_steps: int, *extra: str) -> None:
        try:
            cli_main(["fit", *config_args(*BASE, "logger/wandb.yaml"),
                      f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.max_steps={max_steps}",
                      "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
                      f"--model.init_args.generator.pretrained={tiny_sd}", f"--data.init_args.train_pairs.path={tiny_pairs}",
                      f"--data.init_args.val_pairs.path={tiny_pairs}",
                      "--data.init_args.batch_size=2", *extra])
        finally:
            wandb.finish()

    fit(2)
    (first,) = [p.parent.parent for p in tmp_path.glob("*/*/checkpoints/last.ckpt")]
    fit(4, "--ckpt_path=last")
    runs = {p.parent.parent for p in tmp_path.glob("*/*/checkpoints/*.ckpt")}
    assert runs == {first}  # one run folder: the resumed fit's checkpoints joined the first's
    import torch
    last = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert last["global_step"] == 4 and last["t2i_align_wandb_run"] == first.name
    offline = sorted(tmp_path.glob("wandb/offline-run-*"))
    assert len(offline) == 2 and {p.name.rsplit("-", 1)[-1] for p in offline} == {first.name}  # two segments, one run id
