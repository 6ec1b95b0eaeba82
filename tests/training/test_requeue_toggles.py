"""A checkpoint written in the middle of a CoMat step (Lightning's SLURM SIGUSR1 handler calls
``trainer.save_checkpoint`` at once, wherever the step is) holds every trained network and resumes: the set of
trained keys is fixed once, not read from the live ``requires_grad`` flags that manual optimisation
(``toggled_optimizer``) and peft (``disable_adapters``) switch off during a step."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from t2i_align.datamodules import T2IDataModule
from t2i_align.datamodules.prompts import PromptSource
from t2i_align.diffusion.generator import GeneratorConfig, LoraSettings
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.experts.captioner import BlipLikelihood
from t2i_align.lightning_modules.comat import CoMat
from tests.helpers import save_tiny_captioner

PROMPTS = ["a red circle", "a blue square and a green star"]
WINDOWS = ("generator_toggled", "adapters_disabled", "discriminator_toggled")


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> BlipLikelihood:
    return BlipLikelihood(save_tiny_captioner(tmp_path_factory.mktemp("captioner")), prefix="", max_shift=0)


def make(tiny_sd: str, captioner) -> CoMat:
    torch.manual_seed(0)
    return CoMat(generator=GeneratorConfig(tiny_sd), captioner=captioner,
                 sampling=SamplingSettings(4, guidance_scale=7.5, scheduler="ddpm"), num_grad_steps=2, grad_stride=2,
                 adversarial_weight=1.0, discriminator_lora=LoraSettings(rank=2))


def trainer(tmp_path, max_steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     default_root_dir=tmp_path, callbacks=list(callbacks))


class CheckRestored(L.Callback):
    """Records, when training starts after the restore, whether the module's trained tensors equal ``expected``."""

    def __init__(self, expected: dict[str, torch.Tensor]) -> None:
        self.expected, self.equal = expected, None

    def on_train_start(self, trainer, pl_module) -> None:
        live = pl_module.state_dict()
        self.equal = all(torch.equal(live[k], v) for k, v in self.expected.items())


def test_checkpoints_saved_inside_toggle_windows_hold_both_networks_and_resume(tiny_sd, captioner, tmp_path,
                                                                               monkeypatch):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    data = lambda: T2IDataModule(train_prompts=[PromptSource(str(tmp_path / "prompts.txt"))], batch_size=2)
    module = make(tiny_sd, captioner)
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    generator_keys = {k for k in trained if k.startswith("generator.")}
    discriminator_keys = {k for k in trained if k.startswith("discriminator.")}
    assert generator_keys and discriminator_keys and trained == generator_keys | discriminator_keys
    params = dict(module.named_parameters())
    saved: dict[str, tuple] = {}

    def save(window: str) -> None:
        """What the SIGUSR1 handler does, here: save now; recorded with the live values and flags."""
        if window in saved:
            return
        path = tmp_path / f"{window}.ckpt"
        module.trainer.save_checkpoint(path)
        values = {k: v.detach().clone() for k, v in module.state_dict().items() if k in trained}
        flags = {k: params[k].requires_grad for k in trained}
        saved[window] = (path, values, flags)

    original_discriminate, original_sample = module.discriminate, module.generator.sample

    def discriminate(latents):
        if latents.requires_grad:  # the adversarial term of G's loss: inside toggled_optimizer(G)
            save("generator_toggled")
        else:  # D's own loss: inside toggled_optimizer(D)
            save("discriminator_toggled")
        return original_discriminate(latents)

    def sample(*args, **kwargs):
        if not any(params[k].requires_grad for k in generator_keys):  # frozen_latents: unet.disable_adapters()
            save("adapters_disabled")
        return original_sample(*args, **kwargs)

    monkeypatch.setattr(module, "discriminate", discriminate)
    monkeypatch.setattr(module.generator, "sample", sample)
    monkeypatch.setattr(module, "frozen_latents_lane", lambda *a, **k: None)  # the real latents through frozen_latents
    trainer(tmp_path, max_steps=1).fit(module, datamodule=data())
    assert set(saved) == set(WINDOWS)

    # each window really switched a network's flags off (else this test proves nothing) ...
    off = {w: {k for k, on in saved[w][2].items() if not on} for w in WINDOWS}
    assert off["generator_toggled"] == discriminator_keys
    assert off["discriminator_toggled"] == generator_keys
    assert off["adapters_disabled"] >= {k for k in generator_keys if "lora_" in k} and off["adapters_disabled"]
    for window in WINDOWS:
        path, values, _ = saved[window]
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        # ... yet the checkpoint holds both networks, at the values they had when it was written
        assert set(checkpoint["state_dict"]) == trained, window
        for key, value in values.items():
            assert torch.equal(checkpoint["state_dict"][key], value), (window, key)
        # and a requeued run resumes from it (--ckpt_path), restoring exactly those values
        check = CheckRestored(values)
        resumed = make(tiny_sd, captioner)
        trainer(tmp_path / window, max_steps=checkpoint["global_step"] + 1, callbacks=[check]).fit(
            resumed, datamodule=data(), ckpt_path=path)
        assert check.equal is True, window
        assert resumed.trainable_keys() == trained
