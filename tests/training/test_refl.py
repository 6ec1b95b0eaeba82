"""ReFL: where the gradient enters, which data each loss reads, and training from the CLI."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from t2i_align.cli import main as cli_main
from t2i_align.datamodules import PairSource, T2IDataModule
from t2i_align.datamodules.prompts import PromptSource
from t2i_align.diffusion.generator import GeneratorConfig, LoraSettings
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.lightning_modules import ReFL
from t2i_align.rewards import CaptionReward, CLIPReward
from tests.helpers import REPO_ROOT, save_tiny_captioner, save_tiny_clip

CONFIGS = Path(REPO_ROOT) / "configs"
PROMPTS = ["a red circle", "two blue squares", "a green star above a yellow triangle", "a purple square"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=5)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "train.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def refl(tiny_sd, reward, scheduler="ddpm", **kwargs):
    """ReFL with ImageReward's sampler (no CFG; ``scheduler``) over 6 steps, the grad step in [2, 4]."""
    sampling = SamplingSettings(6, guidance_scale=1.0, scheduler=scheduler)
    kwargs = {"sampling": sampling, "min_step": 2, "max_step": 4, **kwargs}
    return ReFL(generator=GeneratorConfig(pretrained=tiny_sd, lora=LoraSettings(rank=4)), reward=reward, **kwargs)


def trainable_grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_gradient_enters_only_through_the_chosen_step(tiny_sd, clip_dir, scheduler):
    torch.manual_seed(0)
    module = refl(tiny_sd, CLIPReward(clip_dir), scheduler=scheduler, reward_loss="linear", reward_weight=1.0)
    # LoRA B starts at 0; give it values so that the LoRA gradients are not all trivially related
    for name, p in module.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    calls, unet_forward = [], module.generator.unet_forward

    def spy(x, t, c, use_checkpoint=False):
        calls.append((torch.is_grad_enabled(), x.detach().clone(), t, c.detach().clone()))
        return unet_forward(x, t, c, use_checkpoint)

    module.generator.unet_forward = spy
    loss, rewards, m = module.refl_loss(PROMPTS, torch.Generator().manual_seed(7))
    loss.backward()
    assert 2 <= m <= 4
    assert [grad for grad, *_ in calls] == [False] * m + [True]
    via_module = trainable_grads(module)
    assert via_module and all(g.abs().sum() > 0 for n, g in via_module.items() if "lora_A" in n)

    # the same loss from the recorded x_m alone: one UNet call, one-step x0, decode, reward
    module.zero_grad(set_to_none=True)
    _, x, t, c = calls[-1]
    sched = module.generator.make_scheduler(module.sampling)
    x0 = module.generator.predict_x0(sched, x, unet_forward(x, t, c), t)
    (-module.reward(module.generator.decode_latents(x0), PROMPTS).mean()).backward()
    by_hand = trainable_grads(module)
    assert by_hand.keys() == via_module.keys()
    for name in by_hand:
        torch.testing.assert_close(via_module[name], by_hand[name], atol=1e-6, rtol=1e-4, msg=name)


def test_grad_step_is_drawn_from_the_window(tiny_sd, clip_dir):
    module = refl(tiny_sd, CLIPReward(clip_dir))
    gen = torch.Generator().manual_seed(0)
    steps = {module.policy.plan(6, gen).stop_at for _ in range(60)}
    assert steps == {2, 3, 4}


def test_refl_refuses_a_reward_without_a_pixel_gradient(tiny_sd, clip_dir, tmp_path):
    captioner = save_tiny_captioner(tmp_path / "captioner")
    with pytest.raises(ValueError, match="differentiable: true"):
        refl(tiny_sd, CaptionReward(captioner, clip_dir))
    refl(tiny_sd, CaptionReward(captioner, clip_dir, differentiable=True))  # accepted


def test_hinge_and_linear_reward_losses(tiny_sd, clip_dir):
    r = torch.tensor([-0.5, 0.3, 2.5])
    torch.testing.assert_close(refl(tiny_sd, CLIPReward(clip_dir)).phi(r), torch.tensor([2.5, 1.7, 0.0]))
    torch.testing.assert_close(refl(tiny_sd, CLIPReward(clip_dir), reward_loss="linear").phi(r), -r)


class Spy(L.Callback):
    """Records, per training batch, what the module sampled (prompts) and noised (pair captions)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        record = {"sampled": [], "denoised": [], "reward_training": any(m.training for m in module.reward.modules())}
        self.steps.append(record)
        gen = module.generator
        if not hasattr(gen, "_spied"):
            sample, denoise = gen.sample, gen.denoising_loss
            gen.sample = lambda prompts, *a, **k: (self.steps[-1]["sampled"].extend(prompts), sample(prompts, *a, **k))[1]
            gen.denoising_loss = lambda px, caps, *a, **k: (self.steps[-1]["denoised"].extend(caps), denoise(px, caps, *a, **k))[1]
            gen._spied = True


@pytest.mark.parametrize("mode", ["sum", "alternate"])
def test_pretrain_loss_reads_the_pairs_and_the_reward_the_prompts(tiny_sd, tiny_pairs, clip_dir, prompts_file, tmp_path, mode):
    module = refl(tiny_sd, CLIPReward(clip_dir), pretrain_loss=mode)
    data = T2IDataModule(train_prompts=[PromptSource(prompts_file)], train_pairs=PairSource(tiny_pairs), batch_size=2,
                         resolution=32)
    spy = Spy()
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[spy])
    trainer.fit(module, datamodule=data)
    captions = {json.loads(line)["text"] for line in Path(tiny_pairs).read_text().splitlines()}
    assert len(spy.steps) == 4
    for k, step in enumerate(spy.steps):
        reward_turn = mode == "sum" or k % 2 == 0
        pre_turn = mode == "sum" or k % 2 == 1
        assert (len(step["sampled"]) == 2) == reward_turn and set(step["sampled"]) <= set(PROMPTS)
        assert (len(step["denoised"]) == 2) == pre_turn and set(step["denoised"]) <= captions
    assert not any(step["reward_training"] for step in spy.steps)  # the frozen reward never drops out


def test_missing_pairs_is_a_clear_error(tiny_sd, clip_dir, prompts_file):
    module = refl(tiny_sd, CLIPReward(clip_dir))
    data = T2IDataModule(train_prompts=[PromptSource(prompts_file)], batch_size=2, resolution=32)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="data.init_args.train_pairs"):
        trainer.fit(module, datamodule=data)


def test_refl_trains_from_the_cli(tiny_sd, tiny_pairs, clip_dir, prompts_file, tmp_path):
    root = tmp_path / "run"
    cli_main([
        "fit",
        "--config", str(CONFIGS / "trainer/cpu.yaml"),
        "--config", str(CONFIGS / "method/refl.yaml"),
        "--config", str(CONFIGS / "model/tiny.yaml"),
        "--config", str(CONFIGS / "data/tiny_pairs.yaml"),
        f"--model.init_args.generator.pretrained={tiny_sd}",
        "--model.init_args.reward=t2i_align.rewards.CLIPReward",
        f"--model.init_args.reward.init_args.pretrained={clip_dir}",
        "--model.init_args.sampling.num_inference_steps=6", "--model.init_args.min_step=2", "--model.init_args.max_step=4",
        f"--data.init_args.train_prompts=[{{path: {prompts_file}}}]",
        f"--data.init_args.train_pairs.path={tiny_pairs}",
        f"--data.init_args.val_pairs.path={tiny_pairs}",
        "--data.init_args.batch_size=2",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
    ])
    ckpts = list(root.rglob("*.ckpt"))
    assert ckpts
    state = torch.load(ckpts[0], weights_only=True)["state_dict"]
    assert state and all("lora" in k for k in state)  # adapter only: no reward weights in the checkpoint
