"""The method API: two networks with two optimizers (manual optimisation, the NaN guard included), methods
that train nothing, frozen experts outside the module tree, one definition of "trainable"."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from t2i_align.callbacks import ExportWeights, TrainableEMA
from t2i_align.datamodules import PairSource, T2IDataModule
from t2i_align.diffusion.generator import GeneratorConfig
from t2i_align.lightning_modules.base import AlignmentModule, batch_pairs
from tests.helpers import trainable_digest


class TwoNetworks(AlignmentModule):
    """A generator step and a discriminator step per batch (CoMat's shape), with a NaN generator loss on the
    batches in ``nan_batches`` (0-based)."""

    def __init__(self, *args, nan_batches=(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.discriminator = torch.nn.Linear(4, 1)
        self.nan_batches = set(nan_batches)
        self.digests: list[tuple[str, str]] = []

    def configure_optimizers(self):
        return (torch.optim.AdamW(self.generator.trainable_parameters(), lr=1e-2),
                torch.optim.AdamW(self.discriminator.parameters(), lr=1e-2))

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        pairs = batch_pairs(batch, "TwoNetworks")
        loss_g = self.generator.denoising_loss(pairs["pixel_values"], pairs["captions"], self.step_rng())
        if self.batches_started - 1 in self.nan_batches:
            loss_g = loss_g * float("nan")
        self.manual_step(loss_g, opt_g, clip_norm=1.0)
        loss_d = self.discriminator(torch.randn(2, 4, generator=self.step_rng("d"))).pow(2).mean()
        self.manual_step(loss_d, opt_d)
        self.digests.append((digest(self.generator_trainable()), digest(dict(self.discriminator.named_parameters()))))


def digest(params: dict) -> str:
    module = torch.nn.Module()
    for i, (name, p) in enumerate(sorted(params.items())):
        module.register_parameter(f"p{i}", p)
    return trainable_digest(module)


def fit(module, tiny_pairs, tmp_path, steps, callbacks=()):
    data = T2IDataModule(train_pairs=PairSource(path=tiny_pairs), batch_size=2, resolution=32)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
                        enable_checkpointing=False)
    trainer.fit(module, data)
    return trainer


def test_two_optimizers_step_both_networks_and_global_step_counts_optimizer_steps(tiny_sd, tiny_pairs, tmp_path):
    module = TwoNetworks(GeneratorConfig(pretrained=tiny_sd), nan_batches=[1])
    ema = TrainableEMA(decay=0.5)
    trainer = fit(module, tiny_pairs, tmp_path, steps=6, callbacks=[ema, ExportWeights()])
    assert trainer.global_step == 6 and len(module.digests) == 3  # two optimizer steps per batch
    (g0, d0), (g1, d1), (g2, d2) = module.digests
    assert g1 == g0 and g2 != g1  # the NaN generator loss of batch 1 left the generator alone ...
    assert d0 != d1 != d2  # ... while the discriminator kept training
    assert module.nonfinite_total == 1
    # one definition of trainable: checkpoints hold both networks; EMA and export the generator only
    assert any(k.startswith("discriminator.") for k in module.trainable_keys())
    assert set(ema.average) == set(module.generator_trainable()) and not any("discriminator" in k for k in ema.average)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == module.trainable_keys()
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert exported and all(k.startswith("unet.") for k in exported)


class Watcher(AlignmentModule):
    """Trains nothing: an inference-time method."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.generator.requires_grad_(False)
        self.sampled = 0

    def sample(self, prompts, seeds, sampling=None, **kwargs):
        self.sampled += len(prompts)
        return super().sample(prompts, seeds, sampling, **kwargs)


def test_a_method_without_trainable_weights_validates_and_predicts_but_does_not_fit(tiny_sd, tiny_pairs, tmp_path):
    module = Watcher(GeneratorConfig(pretrained=tiny_sd))
    data = T2IDataModule(train_pairs=PairSource(path=tiny_pairs), val_pairs=PairSource(path=tiny_pairs, limit=2),
                         batch_size=2, resolution=32)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    [metrics] = trainer.validate(module, data)
    assert metrics["val/denoise_loss"] > 0
    batch = {"prompts": ["a red circle"], "seeds": [[0, 1]], "sampling": {"num_inference_steps": 2}}
    [images] = module.predict_step(batch, 0)
    assert images.shape == (2, 3, 32, 32) and module.sampled == 2
    from t2i_align.lightning_modules import Finetune

    frozen = Finetune(GeneratorConfig(pretrained=tiny_sd))  # e.g. LoRA target_modules that matched nothing
    frozen.generator.requires_grad_(False)
    with pytest.raises(RuntimeError, match="Finetune has no trainable parameters: it runs through validate, test"):
        trainer.fit(frozen, data)


def test_frozen_experts_are_outside_the_module_tree(tiny_sd):
    from t2i_align.lightning_modules import ReFL
    from t2i_align.rewards import Reward

    class Dropper(Reward):
        differentiable = True

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, images, prompts):
            return self.drop(self.layer(images.mean((2, 3)))).squeeze(1)

    module = ReFL(generator=GeneratorConfig(pretrained=tiny_sd), reward=Dropper())
    assert not any(k.startswith(("reward", "experts")) for k in module.state_dict())  # not in checkpoints ...
    assert all(m is not module.reward for m in module.modules())  # ... nor broadcast by DDP (not a child)
    module.train()
    assert not module.reward.training and not any(p.requires_grad for p in module.reward.parameters())
