"""One contract, every method: each method config, on the tiny models through the CLI, keeps checkpoints to
trainable state loadable with weights_only, resumes exactly, refuses another LoRA rank, skips NaN losses and
stops after the limit, exports weights a plain diffusers pipeline loads, and keeps two DDP ranks equal.

A new method adds one entry to ``METHODS``: its config and the tiny wiring it needs (rewards, data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from t2i_align.cli import main as cli_main
from t2i_align.diffusion.lora import LORA_WEIGHT_NAME
from tests.helpers import REPO_ROOT, save_tiny_captioner, save_tiny_clip

CONFIGS = Path(REPO_ROOT) / "configs"
PROMPTS = ["a red circle", "a blue square", "two green stars", "a yellow star to the left of a red circle"]

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def finetune(ctx: dict, steps: int) -> list[str]:
    return ["--config", str(CONFIGS / "method/finetune.yaml"), "--config", str(CONFIGS / "data/tiny_pairs.yaml"),
            f"--data.init_args.train_pairs.path={ctx['pairs']}", f"--data.init_args.val_pairs.path={ctx['pairs']}",
            f"--trainer.max_steps={steps}"]


def refl(ctx: dict, steps: int) -> list[str]:
    return ["--config", str(CONFIGS / "method/refl.yaml"), "--config", str(CONFIGS / "data/tiny_pairs.yaml"),
            "--model.init_args.reward=t2i_align.rewards.CLIPReward",
            f"--model.init_args.reward.init_args.pretrained={ctx['clip']}",
            "--model.init_args.sampling.num_inference_steps=4", "--model.init_args.min_step=1", "--model.init_args.max_step=3",
            "--model.init_args.reward_weight=1.0",
            f"--data.init_args.train_prompts=[{{path: {ctx['prompts']}}}]",
            f"--data.init_args.train_pairs.path={ctx['pairs']}", f"--data.init_args.val_pairs.path={ctx['pairs']}",
            f"--trainer.max_steps={steps}"]


def arl(ctx: dict, steps: int) -> list[str]:
    """Rounds of 2 updates: ``steps`` must be even."""
    return ["--config", str(CONFIGS / "method/arl.yaml"),
            "--model.init_args.rewards={clip: {class_path: t2i_align.rewards.CLIPReward, init_args: "
            f"{{pretrained: {ctx['clip']}}}}}}}",
            "--model.init_args.candidates=2", "--model.init_args.sampling.num_inference_steps=2",
            "--model.init_args.sampling.guidance_scale=1.0",
            "--data=t2i_align.datamodules.RankedPairsData",
            f"--data.init_args.train_prompts=[{{path: {ctx['prompts']}}}]",
            f"--data.init_args.val_pairs={{path: {ctx['pairs']}}}", "--data.init_args.resolution=32",
            f"--trainer.max_epochs={steps // 2}", "--trainer.limit_train_batches=2",
            "--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=1"]


def comat(ctx: dict, steps: int) -> list[str]:
    """All four parts: concept activation, the discriminator, mixed latents, attribute concentration."""
    return ["--config", str(CONFIGS / "method/comat.yaml"), "--config", str(CONFIGS / "data/tiny_pairs.yaml"),
            f"--model.init_args.captioner.init_args.pretrained={ctx['captioner']}",
            "--model.init_args.captioner.init_args.prefix=", "--model.init_args.sampling.num_inference_steps=4",
            "--model.init_args.num_grad_steps=2", "--model.init_args.grad_stride=2",
            "--model.init_args.discriminator_lora.rank=4", "--model.init_args.mix_ratio=0.5",
            "--model.init_args.segmenter=tests.helpers.HalfSegmenter",
            f"--data.init_args.train_prompts=[{{path: {ctx['prompts']}}}]",
            f"--data.init_args.train_pairs.path={ctx['pairs']}", f"--data.init_args.val_pairs.path={ctx['pairs']}",
            f"--trainer.max_steps={steps}"]


def tokencompose(ctx: dict, steps: int) -> list[str]:
    """The tiny pairs carry one mask per noun (a repeated noun among them)."""
    return ["--config", str(CONFIGS / "method/tokencompose.yaml"), "--config", str(CONFIGS / "data/tiny_pairs.yaml"),
            "--model.init_args.token_weight=0.1", "--model.init_args.pixel_weight=0.01",
            "--model.init_args.optimizer.init_args.lr=1e-3",
            f"--data.init_args.train_pairs.path={ctx['pairs']}", f"--data.init_args.val_pairs.path={ctx['pairs']}",
            f"--trainer.max_steps={steps}"]


#: method config (configs/method/<name>.yaml) -> its tiny wiring for `steps` optimizer steps (generator updates)
METHODS = {"finetune": finetune, "refl": refl, "arl": arl, "comat": comat, "tokencompose": tokencompose}
#: methods that train nothing (their inference is tested in their own test file, fit refuses them there)
TRAINING_FREE = {"fine_stage"}
#: trained parameters besides LoRA a method's checkpoint holds
OTHER_TRAINABLE = {"comat": ("discriminator.head.",)}
#: methods that also run on the tiny SDXL pipeline (issue 28): every trained method (the training-free fine stage's
#: SDXL run is tests/training/test_fine_stage.py's)
SDXL_METHODS = ("finetune", "refl", "arl", "comat", "tokencompose")
#: (method, base model): every method on the tiny SD pipeline (ids as before), those of SDXL_METHODS on the tiny SDXL
ON_BASES = [pytest.param(m, "sd", id=m) for m in METHODS] + [pytest.param(m, "sdxl", id=f"{m}-sdxl")
                                                              for m in SDXL_METHODS]


def test_every_method_config_is_under_contract():
    assert {p.stem for p in (CONFIGS / "method").glob("*.yaml")} == set(METHODS) | TRAINING_FREE
    assert set(SDXL_METHODS) == set(METHODS)  # every trained method also on SDXL


@pytest.fixture(scope="module")
def ctx(tiny_sd, tiny_sdxl, tiny_pairs, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("contract")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"sd": tiny_sd, "sdxl": tiny_sdxl, "pairs": tiny_pairs, "prompts": str(folder / "prompts.txt"),
            "clip": save_tiny_clip(folder / "clip", seed=3), "captioner": save_tiny_captioner(folder / "captioner")}


def args(method: str, ctx: dict, root: Path, steps: int, extra=(), callbacks=(), base: str = "sd") -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    trainer = {"trainer": {"logger": False, "enable_progress_bar": False, "callbacks": [
        {"class_path": "t2i_align.callbacks.StepCheckpoint", "init_args": {"save_last": True, "every_n_train_steps": 1,
                                                                            "save_top_k": -1}},
        {"class_path": "tests.helpers.RecordSteps", "init_args": {"out_dir": str(root / "record")}},
        {"class_path": "t2i_align.callbacks.ExportWeights"}, *callbacks]}}
    (root / "trainer.yaml").write_text(yaml.safe_dump(trainer))
    return ["fit", "--config", str(CONFIGS / "trainer/cpu.yaml"), *METHODS[method](ctx, steps),
            "--config", str(CONFIGS / "model/tiny.yaml"), "--config", str(root / "trainer.yaml"),
            f"--model.init_args.generator.pretrained={ctx[base]}", "--data.init_args.batch_size=2",
            f"--trainer.default_root_dir={root}", *extra]


def records(root: Path, rank: int = 0) -> list[dict]:
    return json.loads((root / "record" / f"rank{rank}.json").read_text())["steps"]


@pytest.mark.parametrize(("method", "base"), ON_BASES)
def test_checkpoint_resume_and_export(method, base, ctx, tmp_path):
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    cli_main(args(method, ctx, straight, steps=4, base=base))
    cli_main(args(method, ctx, first, steps=2, base=base))
    # resume into another folder from the first run's last checkpoint
    cli_main(args(method, ctx, resumed, steps=4, extra=[f"--ckpt_path={first / 'checkpoints' / 'last.ckpt'}"],
                  base=base))

    ckpt = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)  # plain types only
    assert ckpt["global_step"] == 4
    keys = set(ckpt["state_dict"])
    other = OTHER_TRAINABLE.get(method, ())
    assert keys and all("lora_" in k or k.startswith(other) for k in keys)  # trainable only: no base, no experts
    assert all(any(k.startswith(prefix) for k in keys) for prefix in other)

    a, b = ckpt["state_dict"], torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    whole, halves = records(straight), records(first) + records(resumed)
    assert [s["step"] for s in halves] == [s["step"] for s in whole] == [1, 2, 3, 4]
    assert [s["ids"] for s in halves] == [s["ids"] for s in whole]
    for s, t in zip(whole, halves):
        assert s["loss"] == pytest.approx(t["loss"], abs=1e-6), s["step"]
    assert len({s["digest"] for s in whole}) == 4  # the weights changed every step: the comparison is not vacuous

    # the exported LoRA loads into a plain diffusers pipeline and changes what it draws
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if base == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(ctx["sdxl"], add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(ctx["sd"], safety_checker=None, requires_safety_checker=False)
    draw = lambda: pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="pt",  # noqa: E731
                        generator=torch.Generator().manual_seed(0)).images
    before = draw()
    pipe.load_lora_weights(str(straight / "lora"), weight_name=LORA_WEIGHT_NAME)  # offline, older diffusers need it
    assert not torch.equal(draw(), before)

    # a checkpoint of another LoRA rank is refused with one sentence
    with pytest.raises(RuntimeError, match="was trained with LoRA rank 4; this model has rank 8"):
        cli_main(args(method, ctx, tmp_path / "rank8", steps=4, base=base,
                      extra=["--model.init_args.generator.lora.rank=8",
                             f"--ckpt_path={straight / 'checkpoints' / 'last.ckpt'}"]))


@pytest.mark.parametrize(("method", "base"), ON_BASES)
def test_nonfinite_losses_are_skipped_then_stop_the_run(method, base, ctx, tmp_path):
    nan = {"class_path": "tests.helpers.NaNUNet", "init_args": {"batches": [1]}}
    cli_main(args(method, ctx, tmp_path / "one", steps=4, callbacks=[nan], base=base,
                  extra=["--model.init_args.max_consecutive_nonfinite=2"]))
    steps = records(tmp_path / "one")
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # the skipped batch still counts
    digests = [s["digest"] for s in steps]
    assert digests[1] == digests[0] and digests[2] != digests[1]  # batch 1 changed nothing; training went on

    nans = {"class_path": "tests.helpers.NaNUNet", "init_args": {"batches": [1, 2]}}
    with pytest.raises(RuntimeError, match="NaN/inf on 2 consecutive steps"):
        cli_main(args(method, ctx, tmp_path / "two", steps=4, callbacks=[nans], base=base,
                      extra=["--model.init_args.max_consecutive_nonfinite=2"]))


@pytest.mark.ddp
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_keep_equal_weights(method, ctx, tmp_path):
    root = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    command = args(method, ctx, root, steps=2, extra=["--trainer.strategy=ddp", "--trainer.devices=2"])
    proc = subprocess.run([sys.executable, "-m", "t2i_align.cli", *command], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [records(root, r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert [s["digest"] for s in ranks[0]] == [s["digest"] for s in ranks[1]]
    assert ranks[0][0]["digest"] != ranks[0][1]["digest"]
