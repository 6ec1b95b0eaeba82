"""Manual optimisation (CoMat's two networks) under ``precision: 16-mixed``'s loss scaling: ``manual_step`` clips the
*unscaled* gradients at ``clip_norm`` (Lightning's plugin unscales them only inside the step), and a skipped
(NaN) batch does not reach ``GradScaler.step``, which asserts on an optimizer without gradients. On CPU: the
real ``MixedPrecision`` plugin and ``GradScaler``, with float32 forwards instead of float16 autocast."""

from __future__ import annotations

import contextlib

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from t2i_align.datamodules import PairSource, T2IDataModule
from t2i_align.diffusion.generator import GeneratorConfig
from t2i_align.lightning_modules.base import AlignmentModule, batch_pairs

SCALE = 2.0**16
CLIP = 0.1


class ScaledFloat32(MixedPrecision):
    """16-mixed's loss scaling (a real ``GradScaler``, scale 2**16) with float32 forwards: the gradient handling of
    ``precision: 16-mixed`` on a CPU."""

    def __init__(self) -> None:
        super().__init__("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=10**6))

    @contextlib.contextmanager
    def forward_context(self):
        yield


def grad_norm(optimizer: torch.optim.Optimizer) -> float:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


class TwoNetworks(AlignmentModule):
    """A generator and a discriminator update per batch with large gradients clipped at ``CLIP``; records the
    gradient norm each optimizer steps with (after the plugin's unscale)."""

    def __init__(self, *args, nan_batches=(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.discriminator = torch.nn.Linear(4, 1)
        self.nan_batches = set(nan_batches)
        self.norms: dict[str, list[float]] = {"g": [], "d": []}

    def configure_optimizers(self):
        g = torch.optim.SGD(list(self.generator_trainable().values()), lr=1e-3)
        d = torch.optim.SGD(self.discriminator.parameters(), lr=1e-3)
        g.register_step_pre_hook(lambda opt, args, kwargs: self.norms["g"].append(grad_norm(opt)))
        d.register_step_pre_hook(lambda opt, args, kwargs: self.norms["d"].append(grad_norm(opt)))
        return g, d

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        pairs = batch_pairs(batch, "TwoNetworks")
        with self.toggled_optimizer(opt_g):
            loss = 1e3 * self.generator.denoising_loss(pairs["pixel_values"], pairs["captions"], self.step_rng())
            if self.batches_started - 1 in self.nan_batches:
                loss = loss * float("nan")
            self.manual_step(loss, opt_g, clip_norm=CLIP)
        with self.toggled_optimizer(opt_d):
            x = torch.randn(8, 4, generator=self.step_rng("d"))
            self.manual_step(1e3 * self.discriminator(x).pow(2).mean(), opt_d, clip_norm=CLIP, count_step=False)


def fit(module, tiny_pairs, tmp_path, steps: int) -> L.Trainer:
    plugin = ScaledFloat32()
    data = T2IDataModule(train_pairs=PairSource(path=tiny_pairs), batch_size=2, resolution=32)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        plugins=[plugin])
    trainer.fit(module, data)
    assert trainer.precision_plugin is plugin
    return trainer


def test_clipping_acts_on_the_unscaled_gradients(tiny_sd, tiny_pairs, tmp_path):
    module = TwoNetworks(GeneratorConfig(pretrained=tiny_sd))
    trainer = fit(module, tiny_pairs, tmp_path, steps=2)
    assert trainer.precision_plugin.scaler.get_scale() == SCALE  # no overflow: every step was taken
    assert len(module.norms["g"]) == len(module.norms["d"]) == 2
    # Both updates step with gradients of norm CLIP (they are larger before clipping, else the norm would be lower),
    # not CLIP / 2**16 (clipped while still scaled)
    for norm in module.norms["g"] + module.norms["d"]:
        assert norm == pytest.approx(CLIP, rel=1e-4)


def test_a_skipped_batch_does_not_call_the_scaler_and_still_counts(tiny_sd, tiny_pairs, tmp_path):
    module = TwoNetworks(GeneratorConfig(pretrained=tiny_sd), nan_batches=[1])
    trainer = fit(module, tiny_pairs, tmp_path, steps=3)  # GradScaler.step asserted "No inf checks were recorded"
    assert trainer.global_step == 3 and module.nonfinite_total == 1
    assert len(module.norms["g"]) == 2 and len(module.norms["d"]) == 3  # the generator skipped batch 1
    assert trainer.precision_plugin.scaler.get_scale() == SCALE
