"""Finetune through the CLI: exact resume, resume after SIGKILL, adapter-only checkpoints, NaN guard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel

from t2i_align.cli import main as cli_main
from t2i_align.datamodules import PairSource, T2IDataModule
from t2i_align.diffusion.generator import GeneratorConfig
from tests.helpers import REPO_ROOT, NaNFinetune, RecordSteps, tiny_fit_args, trainable_digest

CONFIGS = Path(REPO_ROOT) / "configs"


def trainer_yaml(path: Path, every: int, record_dir: Path) -> str:
    """A trainer config stacked after cpu.yaml: checkpoints every `every` steps and a step recorder."""
    cfg = {
        "trainer": {
            "logger": False,
            "enable_progress_bar": False,
            "val_check_interval": 3,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "every_n_train_steps": every, "save_top_k": -1},
                },
                {"class_path": "tests.helpers.RecordSteps", "init_args": {"out_dir": str(record_dir)}},
                {"class_path": "t2i_align.callbacks.ExportWeights"},
            ],
        }
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def fit_args(tiny_sd, tiny_pairs, root: Path, max_steps: int, every: int = 3, extra=()) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    trainer = trainer_yaml(root / "trainer.yaml", every, root / "record")
    return [*tiny_fit_args(tiny_sd, tiny_pairs, root, max_steps, trainer), *extra]


def final_state(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)


def records(root: Path, rank: int = 0) -> list[dict]:
    return json.loads((root / "record" / f"rank{rank}.json").read_text())["steps"]


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_resume_equals_uninterrupted_training(tiny_sd, tiny_pairs, tmp_path):
    straight, first, second = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    cli_main(fit_args(tiny_sd, tiny_pairs, straight, max_steps=6))
    cli_main(fit_args(tiny_sd, tiny_pairs, first, max_steps=3))
    cli_main(fit_args(tiny_sd, tiny_pairs, second, max_steps=6,
                      extra=[f"--ckpt_path={first / 'checkpoints' / 'last.ckpt'}"]))
    a, b = final_state(straight), final_state(second)
    assert a["global_step"] == b["global_step"] == 6
    assert_same_weights(a["state_dict"], b["state_dict"])
    # the resumed run continued the same data stream: no repeat, no skip
    straight_ids = [r["ids"] for r in records(straight)]
    assert [r["ids"] for r in records(first)] + [r["ids"] for r in records(second)] == straight_ids
    # and training changed the weights at all (the comparison above is not vacuous)
    assert len({r["digest"] for r in records(straight)}) == 6


def test_checkpoint_holds_only_trainable_state(tiny_sd, tiny_pairs, tmp_path):
    lora_root, full_root = tmp_path / "lora", tmp_path / "full"
    cli_main(fit_args(tiny_sd, tiny_pairs, lora_root, max_steps=1, every=1))
    cli_main(fit_args(tiny_sd, tiny_pairs, full_root, max_steps=1, every=1,
                      extra=["--config", str(CONFIGS / "model/full_unet.yaml")]))
    lora_ckpt = torch.load(lora_root / "checkpoints" / "last.ckpt", weights_only=True)
    full_ckpt = torch.load(full_root / "checkpoints" / "last.ckpt", weights_only=True)
    keys = list(lora_ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys)
    assert not any(k.startswith(("generator.vae", "generator.text_encoder")) for k in keys)
    full_keys = set(full_ckpt["state_dict"])
    assert all(k.startswith("generator.unet.") for k in full_keys)
    assert not any("lora_" in k for k in full_keys)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    assert len(full_keys) == len(list(unet.parameters()))
    lora_size = (lora_root / "checkpoints" / "last.ckpt").stat().st_size
    full_size = (full_root / "checkpoints" / "last.ckpt").stat().st_size
    assert lora_size < full_size / 5
    # the LoRA export lands next to the checkpoints, and resume-state is there
    assert (lora_root / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert {"optimizer_states", "t2i_align", "loops"} <= set(lora_ckpt)
    assert any(k.endswith("T2IDataModule") for k in lora_ckpt)


def test_checkpoint_from_another_lora_config_is_refused(tiny_sd, tiny_pairs, tmp_path):
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path / "r4", max_steps=1, every=1))
    with pytest.raises(RuntimeError, match="was trained with LoRA; this model is set up for full UNet fine-tuning"):
        cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path / "full", max_steps=2, every=1,
                          extra=["--config", str(CONFIGS / "model/full_unet.yaml"),
                                 f"--ckpt_path={tmp_path / 'r4' / 'checkpoints' / 'last.ckpt'}"]))


def test_run_killed_with_sigkill_resumes_from_last_checkpoint(tiny_sd, tiny_pairs, tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    cmd = [sys.executable, "-m", "t2i_align.cli", *fit_args(tiny_sd, tiny_pairs, killed, max_steps=30, every=1)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_dir = killed / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list(ckpt_dir.glob("epoch=*.ckpt"))) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # whatever the kill interrupted, every checkpoint under its final name is complete
    for path in ckpt_dir.glob("*.ckpt"):
        torch.load(path, weights_only=True)
    step_at_kill = torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"]
    assert 4 <= step_at_kill < 30  # last.ckpt is written just after the step checkpoint
    cli_main(fit_args(tiny_sd, tiny_pairs, killed, max_steps=30, every=1, extra=["--ckpt_path=last"]))
    cli_main(fit_args(tiny_sd, tiny_pairs, straight, max_steps=30, every=30))
    a, b = final_state(straight), final_state(killed)
    assert b["global_step"] == 30
    assert_same_weights(a["state_dict"], b["state_dict"])


def test_nonfinite_loss_skips_the_step_and_stops_after_the_limit(tiny_sd, tiny_pairs, tmp_path):
    def fit(nan_batches, max_steps, limit):
        model = NaNFinetune(GeneratorConfig(pretrained=tiny_sd), nan_batches=nan_batches, max_consecutive_nonfinite=limit)
        data = T2IDataModule(train_pairs=PairSource(path=tiny_pairs), batch_size=2, resolution=32)
        rec = RecordSteps(str(tmp_path / "rec"))
        logger = L.pytorch.loggers.CSVLogger(tmp_path, name="nan")
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=logger, log_every_n_steps=1,
                            enable_checkpointing=False, enable_progress_bar=False, callbacks=[rec])
        before = trainable_digest(model)
        trainer.fit(model, data)
        return model, trainer, rec, before

    model, trainer, rec, _ = fit([1, 2], max_steps=4, limit=3)
    # Lightning still counts the skipped batches as (empty) optimizer steps: no update, no moments touched
    assert model.nonfinite_total == 2 and trainer.global_step == 4 and len(rec.steps) == 4
    digests = [s["digest"] for s in rec.steps]
    assert digests[1] == digests[2] == digests[0]  # skipped steps left the weights alone
    assert digests[3] != digests[2]
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "train/nonfinite_steps" in metrics

    with pytest.raises(RuntimeError, match="3 consecutive steps"):
        fit([0, 1, 2], max_steps=4, limit=3)
