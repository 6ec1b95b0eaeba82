"""Export the LoRA in the diffusers format during and at the end of training."""

from __future__ import annotations

import os

import lightning as L

from t2i_align.diffusion.lora import export_lora


class ExportLoRA(L.Callback):
    """Write ``<dirpath>/pytorch_lora_weights.safetensors`` (loadable with ``pipeline.load_lora_weights``).

    Args:
        dirpath: output folder; default ``<trainer.default_root_dir>/lora``.
        every_n_train_steps: also export every N optimizer steps into ``<dirpath>/step_<N>``.
        at_train_end: export the final weights into ``dirpath`` when training ends.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int | None = None, at_train_end: bool = True) -> None:
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.at_train_end = at_train_end

    def _dir(self, trainer: L.Trainer) -> str:
        return self.dirpath or os.path.join(trainer.default_root_dir, "lora")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0 and trainer.is_global_zero:
            export_lora(pl_module.generator, os.path.join(self._dir(trainer), f"step_{trainer.global_step}"))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end and trainer.is_global_zero:  # file export on rank 0 only; weights are identical
            export_lora(pl_module.generator, self._dir(trainer))
