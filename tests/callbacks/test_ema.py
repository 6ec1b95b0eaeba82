"""TrainableEMA: the average it keeps, what validation sees, adapter-only checkpoints and exact resume."""

import lightning as L
import torch

from t2i_align.callbacks import TrainableEMA
from t2i_align.datamodules import PairSource, T2IDataModule
from t2i_align.diffusion.generator import GeneratorConfig, LoraSettings
from t2i_align.lightning_modules import Finetune


class Snapshots(L.Callback):
    """Trainable weights after every optimizer step and at every validation."""

    def __init__(self):
        self.steps, self.validations = [], []

    @staticmethod
    def take(module):
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer, module):
        self.steps.append(self.take(module))

    def on_train_batch_end(self, trainer, module, *args):
        self.steps.append(self.take(module))

    def on_validation_epoch_end(self, trainer, module):
        self.validations.append((trainer.global_step, self.take(module)))


def fit(tiny_sd, tiny_pairs, root, steps, callbacks, ckpt_path=None):
    torch.manual_seed(0)
    module = Finetune(generator=GeneratorConfig(pretrained=tiny_sd, lora=LoraSettings(rank=4)),
                      optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    data = T2IDataModule(train_pairs=PairSource(tiny_pairs), val_pairs=PairSource(tiny_pairs, limit=2), batch_size=2,
                         resolution=32)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), val_check_interval=2,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


def manual_ema(steps, decay):
    average = {n: v.clone() for n, v in steps[0].items()}
    out = [average]
    for weights in steps[1:]:
        average = {n: average[n] + (1 - decay) * (weights[n] - average[n]) for n in average}
        out.append(average)
    return out


def assert_close(a, b):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5, msg=n)


def test_ema_average_validation_and_end_of_fit(tiny_sd, tiny_pairs, tmp_path):
    snaps = Snapshots()
    module = fit(tiny_sd, tiny_pairs, tmp_path, 4, [TrainableEMA(decay=0.5), snaps])
    expected = manual_ema(snaps.steps, 0.5)
    assert len(snaps.steps) == 5
    # validation at steps 2 and 4 sees the average, not the raw weights
    for step, seen in snaps.validations:
        assert_close(seen, expected[step])
        assert any((seen[n] - snaps.steps[step][n]).abs().max() > 1e-4 for n in seen)
    assert_close(Snapshots.take(module), expected[4])  # apply_at_end
    # training went on from the raw weights: the same trajectory as a run without the callback
    plain = Snapshots()
    fit(tiny_sd, tiny_pairs, tmp_path / "plain", 4, [plain])
    for a, b in zip(plain.steps, snaps.steps, strict=True):
        assert_close(a, b)


def test_checkpoints_stay_adapter_only_and_resume_continues_the_average(tiny_sd, tiny_pairs, tmp_path):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "a" / "ckpt", every_n_train_steps=2, save_top_k=-1)
    straight = fit(tiny_sd, tiny_pairs, tmp_path / "a", 4, [TrainableEMA(decay=0.5), ckpt])
    saved = torch.load(tmp_path / "a" / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)
    trainable = set(Snapshots.take(straight))
    assert set(saved["state_dict"]) == trainable  # the raw weights, adapter only
    (ema_state,) = [v for k, v in saved["callbacks"].items() if "TrainableEMA" in k]
    assert set(ema_state["average"]) == trainable and ema_state["updated_at"] == 2

    resumed = fit(tiny_sd, tiny_pairs, tmp_path / "b", 4, [TrainableEMA(decay=0.5)],
                  ckpt_path=str(tmp_path / "a" / "ckpt" / "epoch=0-step=2.ckpt"))
    assert_close(Snapshots.take(resumed), Snapshots.take(straight))
