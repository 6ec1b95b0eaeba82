"""Runs a researcher can trust: `--ckpt_path last` resumes under every logger layout, resuming with nothing
to resume from stops, failures leave no run folder, a killed save leaves no temporaries, checkpoint mistakes
give one sentence, and the command prints no noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb
import yaml
from safetensors.torch import load_file

from t2i_align.cli import main as cli_main
from t2i_align.io import _HOST, CheckpointError, clean_stale_temporaries
from tests.helpers import REPO_ROOT, tiny_fit_args

CONFIGS = Path(REPO_ROOT) / "configs"


def fit_args(tiny_sd, tiny_pairs, root: Path, max_steps: int, logger: str | None = "csv", extra=(),
             export: dict | None = None) -> list[str]:
    """A tiny Finetune fit whose logger (csv / wandb / None) writes under ``root``; checkpoints every 2 steps
    (and at the end); exports every 2 steps (``export``: other ExportWeights arguments); records the global
    step after every batch in ``root/record``."""
    root.mkdir(parents=True, exist_ok=True)
    callbacks = [
        {"class_path": "t2i_align.callbacks.StepCheckpoint", "init_args": {"save_last": True, "every_n_train_steps": 2}},
        {"class_path": "tests.helpers.RecordSteps", "init_args": {"out_dir": str(root / "record")}},
        {"class_path": "t2i_align.callbacks.ExportWeights", "init_args": export or {"every_n_train_steps": 2}},
    ]
    (root / "trainer.yaml").write_text(yaml.safe_dump({"trainer": {
        "enable_progress_bar": False, "val_check_interval": 100, "callbacks": callbacks}}))
    logger_args = (["--config", str(CONFIGS / f"logger/{logger}.yaml"), f"--trainer.logger.init_args.save_dir={root}"]
                   if logger else ["--trainer.logger=false"])
    return [*tiny_fit_args(tiny_sd, tiny_pairs, root, max_steps, root / "trainer.yaml"), *logger_args, *extra]


def recorded_steps(root: Path) -> list[int]:
    return [s["step"] for s in json.loads((root / "record" / "rank0.json").read_text())["steps"]]


@pytest.mark.parametrize("logger", ["csv", "wandb", None])
def test_resume_last_continues_at_the_saved_step(tiny_sd, tiny_pairs, tmp_path, logger, monkeypatch):
    def fit(*args, **kwargs):
        try:
            cli_main(fit_args(*args, **kwargs))
        finally:
            wandb.finish()  # what the end of the process does; else the next fit attaches to this W&B run

    monkeypatch.chdir(tmp_path)  # W&B writes its own records under ./wandb
    fit(tiny_sd, tiny_pairs, tmp_path, max_steps=3, logger=logger)
    first = sorted(tmp_path.rglob("last.ckpt"))
    assert len(first) == 1 and torch.load(first[0], weights_only=True)["global_step"] == 3  # 3: saved at the end
    fit(tiny_sd, tiny_pairs, tmp_path, max_steps=5, logger=logger, extra=["--ckpt_path=last"])
    assert recorded_steps(tmp_path) == [4, 5]  # continued after step 3; no retraining from step 0
    newest = max(tmp_path.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert torch.load(newest, weights_only=True)["global_step"] == 5


def test_resume_last_with_nothing_to_resume_stops_and_last_or_new_starts(tiny_sd, tiny_pairs, tmp_path):
    with pytest.raises(CheckpointError, match=r"--ckpt_path last: no checkpoint of this run in .*Drop --ckpt_path"):
        cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=2, extra=["--ckpt_path=last"]))
    assert not list(tmp_path.rglob("version_*"))  # refused before anything was created
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=2, extra=["--ckpt_path=last_or_new"]))
    assert recorded_steps(tmp_path) == [1, 2]


def test_resume_last_never_takes_another_configurations_checkpoint(tiny_sd, tiny_pairs, tmp_path):
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=2))
    other = ["--model.init_args.optimizer.init_args.lr=0.5"]
    with pytest.raises(CheckpointError, match=r"\d checkpoint\(s\) there belong elsewhere.*"
                                              r"model\.init_args\.optimizer\.init_args\.lr differ"):
        cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=4, extra=[*other, "--ckpt_path=last"]))
    # the number of workers is not part of what is trained: it may change between segments of a run
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=3,
                      extra=["--data.init_args.num_workers=1", "--ckpt_path=last"]))
    assert recorded_steps(tmp_path) == [3]


def test_failed_setup_leaves_no_run_folder_and_uses_no_version(tiny_sd, tiny_pairs, tmp_path):
    with pytest.raises(ValueError, match=r"data\.init_args\.resolution=31 is not a multiple of the VAE's downsampling "
                                         r"factor 2 .*use 30 or 32"):
        cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=2, extra=["--data.init_args.resolution=31"]))
    assert not list((tmp_path / "t2i-align").glob("version_*"))
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=1))
    assert [p.name for p in (tmp_path / "t2i-align").iterdir()] == ["version_0"]


def test_each_run_keeps_its_exports_and_intermediate_exports_survive(tiny_sd, tiny_pairs, tmp_path):
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=4))
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=5, extra=["--ckpt_path=last"]))
    runs = tmp_path / "t2i-align"
    weights = "pytorch_lora_weights.safetensors"
    assert {str(p.relative_to(runs)) for p in runs.rglob(weights)} == {
        f"version_0/lora/step_2/{weights}", f"version_0/lora/step_4/{weights}", f"version_0/lora/{weights}",
        f"version_1/lora/{weights}",  # the resumed segment (step 5) in its own folder; nothing overwritten
    }
    step4, final = (load_file(runs / "version_0/lora" / sub / weights) for sub in ("step_4", ""))
    assert step4.keys() == final.keys() and all(torch.equal(step4[k], final[k]) for k in step4)


@pytest.mark.parametrize("every", [None, 2], ids=["final export fails", "step export fails"])
def test_a_failed_export_never_costs_a_checkpoint(tiny_sd, tiny_pairs, tmp_path, every):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the export folder should go")
    export = {"dirpath": str(blocker / "lora"), "every_n_train_steps": every}
    with pytest.raises(OSError):
        cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=3, export=export))
    saved = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)["global_step"]
    # the final step when the final export failed; the step of the failed export when a step export did
    assert saved == (3 if every is None else 2)


def _killed_writer(target: Path, is_dir: bool) -> None:
    """A process killed (SIGKILL) in the middle of an atomic write of ``target``."""
    written = "tmp / 'part'" if is_dir else "tmp"
    code = (
        "import os\nfrom t2i_align.io import atomic_path\n"
        f"with atomic_path({str(target)!r}, is_dir={is_dir}) as tmp:\n"
        f"    ({written}).write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT})


def test_a_killed_save_leaves_nothing_after_the_next_start(tiny_sd, tiny_pairs, tmp_path):
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=2))
    ckpt_dir = next(tmp_path.rglob("checkpoints"))
    _killed_writer(ckpt_dir / "epoch=0-step=4.ckpt", is_dir=False)
    _killed_writer(ckpt_dir.parent / "lora" / "step_4", is_dir=True)
    leftovers = [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]
    assert len(leftovers) == 2  # the hidden, truncated temporaries of the two writes
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=3, extra=["--ckpt_path=last"]))
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith((".tmp", ".old"))]


def test_stale_temporaries_live_writers_and_an_interrupted_folder_swap(tmp_path):
    target = tmp_path / "unet"
    target.mkdir()
    (target / "weights").write_text("old")
    # killed between the two renames of a folder swap: the previous folder is aside, the target is missing
    aside = tmp_path / ".unet.otherhost.1.abcd1234.old"
    os.replace(target, aside)
    alive = tmp_path / f".x.ckpt.{_HOST}.{os.getpid()}.a1b2c3d4.tmp"
    alive.mkdir()  # a temporary of a writer that is still running (this process)
    foreign = tmp_path / ".y.ckpt.otherhost.1.zz99.tmp"
    foreign.mkdir()  # a recent temporary of a writer on another machine: it may be alive
    assert clean_stale_temporaries([tmp_path]) == []  # nothing old enough from the other host
    old = os.path.getmtime(aside) - 2 * 24 * 3600
    for p in (aside, foreign):
        os.utime(p, (old, old))
    assert sorted(p.name for p in clean_stale_temporaries([tmp_path])) == sorted([aside.name, foreign.name])
    assert (target / "weights").read_text() == "old"  # put back, not deleted
    assert alive.exists()


# ------------------------------------------------------------------------------------- checkpoint mistakes
def test_checkpoint_mistakes_give_one_sentence_naming_the_file(tiny_sd, tiny_pairs, tmp_path):
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path / "r4", max_steps=1, logger=None))
    good = tmp_path / "r4" / "checkpoints" / "last.ckpt"

    def refused(path: Path, *extra: str) -> str:
        with pytest.raises((CheckpointError, RuntimeError)) as info:
            cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path / "next", max_steps=2, logger=None,
                              extra=[*extra, f"--ckpt_path={path}"]))
        message = str(info.value)
        assert "\n" not in message and str(path) in message
        return message

    rank8 = refused(good, "--model.init_args.generator.lora.rank=8")
    assert "was trained with LoRA rank 4; this model has rank 8" in rank8
    full = refused(good, "--config", str(CONFIGS / "model/full_unet.yaml"))
    assert "was trained with LoRA; this model is set up for full UNet fine-tuning" in full
    text = tmp_path / "notes.ckpt"
    text.write_text("hello, this is not a checkpoint\n")
    assert "is not a PyTorch checkpoint: it is a text file starting with 'hello, this is n'" in refused(text)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "is truncated or corrupt" in refused(truncated)
    exported = next((tmp_path / "r4").rglob("pytorch_lora_weights.safetensors"))
    assert "looks like a safetensors file" in refused(exported)
    assert "does not exist" in refused(tmp_path / "missing.ckpt")
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "obj": Path("x")}, pickled)
    assert "holds Python objects other than tensors" in refused(pickled)


def test_command_line_prints_one_sentence_without_traceback(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("oops")
    proc = subprocess.run([sys.executable, "-m", "t2i_align.cli", "fit", "--config", str(CONFIGS / "experiment/tiny_demo.yaml"),
                           f"--ckpt_path={bad}"], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == f"t2i-align: error: {bad} is not a PyTorch checkpoint: it is a text file starting with 'oops'"
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ noise
def test_a_run_prints_no_known_noise_and_writes_plain_yaml(tiny_sd, tiny_pairs, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    args = fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=2, extra=["--trainer.enable_progress_bar=true"])
    proc = subprocess.run([sys.executable, "-m", "t2i_align.cli", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for noise in ("torchvision", "eval mode", "Tip:", "No seed found", "LeafSpec", "/-2", "Warning", "warn("):
        assert noise not in output, f"{noise!r} in:\n{output[-3000:]}"
    assert output.count("Seed set to 0") == 1
    hparams = next(tmp_path.rglob("hparams.yaml"))
    assert yaml.safe_load(hparams.read_text())["model"]["class_path"] == "t2i_align.lightning_modules.Finetune"
    help_text = subprocess.run([sys.executable, "-m", "t2i_align.cli", "--help"], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True).stdout
    assert "Lightning Trainer command line tool" not in help_text and "text-image alignment" in help_text
