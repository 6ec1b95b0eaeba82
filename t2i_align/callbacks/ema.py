"""``TrainableEMA``: an exponential moving average of the *trainable* weights only (ImageReward's ReFL keeps
an EMA of the UNet).

Lightning's ``EMAWeightAveraging`` deep-copies the whole LightningModule (the frozen base model and the
reward models too) and writes the full model state into checkpoints, which defeats the adapter-only
checkpoints of :class:`~t2i_align.lightning_modules.AlignmentModule`. This callback keeps a float32 copy of
the trainable parameters, updates it after every optimizer step, and saves it in its own (small) callback
state, so a resumed run continues the same average.

Validation (and the evaluation callbacks, which run inside it) sees the EMA weights; training continues
from the raw ones. When fit ends the EMA weights are copied into the model (``apply_at_end``), so list this
callback *before* ``ExportWeights`` to export them.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class TrainableEMA(L.Callback):
    """Args:
        decay: EMA decay per optimizer step.
        apply_at_end: copy the EMA weights into the model when fit ends.
    """

    def __init__(self, decay: float = 0.999, apply_at_end: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.apply_at_end = decay, apply_at_end
        self.average: dict[str, torch.Tensor] | None = None
        self.updated_at = 0  # global step of the last update
        self._pending: dict[str, Any] | None = None
        self._raw: dict[str, torch.Tensor] | None = None

    @staticmethod
    def trainable(pl_module) -> dict[str, torch.nn.Parameter]:
        """The generator's trained weights (``AlignmentModule.generator_trainable``): a discriminator or other
        network a method trains is not averaged."""
        return pl_module.generator_trainable()

    def on_fit_start(self, trainer, pl_module) -> None:
        params = self.trainable(pl_module)
        self.average = {name: p.detach().float().clone() for name, p in params.items()}
        if self._pending is not None:
            saved = self._pending["average"]
            if saved.keys() != self.average.keys():
                raise RuntimeError("TrainableEMA: the checkpoint's EMA does not match the trainable parameters")
            self.average = {name: saved[name].to(p.device, torch.float32) for name, p in params.items()}
            self.updated_at = self._pending["updated_at"]
            self._pending = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step <= self.updated_at:
            return  # no optimizer step this batch (accumulation, skipped step)
        for name, p in self.trainable(pl_module).items():
            self.average[name].lerp_(p.detach().float(), 1.0 - self.decay)
        self.updated_at = trainer.global_step

    @torch.no_grad()
    def _load(self, pl_module, values: dict[str, torch.Tensor]) -> None:
        for name, p in self.trainable(pl_module).items():
            p.copy_(values[name].to(p.dtype))

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.average is not None and trainer.state.fn == "fit":
            self._raw = {name: p.detach().clone() for name, p in self.trainable(pl_module).items()}
            self._load(pl_module, self.average)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._raw is not None:
            self._load(pl_module, self._raw)
            self._raw = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.apply_at_end and self.average is not None:
            self._load(pl_module, self.average)

    def state_dict(self) -> dict[str, Any]:
        if self.average is None:
            return {}
        return {"average": {k: v.cpu() for k, v in self.average.items()}, "updated_at": self.updated_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending = dict(state_dict)
