"""Export the trained weights in diffusers formats during and at the end of training."""

from __future__ import annotations

import os

import lightning as L

from t2i_align.diffusion.lora import export_trained_weights


class ExportWeights(L.Callback):
    """Write the LoRA as ``<dirpath>/pytorch_lora_weights.safetensors`` (for ``pipeline.load_lora_weights``),
    or a fully fine-tuned UNet as ``<dirpath>/unet/`` (for ``UNet2DConditionModel.from_pretrained``).

    Args:
        dirpath: output folder; default ``<trainer.default_root_dir>/lora``.
        every_n_train_steps: also export every N optimizer steps into ``<dirpath>/step_<N>``.
        at_train_end: export the final weights into ``dirpath`` when training ends.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int | None = None, at_train_end: bool = True) -> None:
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.at_train_end = at_train_end
        self._last_exported_step = -1

    def _dir(self, trainer: L.Trainer) -> str:
        return self.dirpath or os.path.join(trainer.default_root_dir, "lora")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, n = trainer.global_step, self.every_n_train_steps
        if n and step > 0 and step % n == 0 and step != self._last_exported_step:
            self._last_exported_step = step  # a skipped (non-finite) batch leaves global_step unchanged
            if trainer.is_global_zero:  # file export on rank 0 only; the weights are identical on all ranks
                export_trained_weights(pl_module.generator, os.path.join(self._dir(trainer), f"step_{step}"))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end and trainer.is_global_zero:
            export_trained_weights(pl_module.generator, self._dir(trainer))
