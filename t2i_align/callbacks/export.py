"""Export the trained weights in diffusers formats during and at the end of training."""

from __future__ import annotations

import os

import lightning as L

from t2i_align.diffusion.lora import export_trained_weights
from t2i_align.runs import run_dir


class ExportWeights(L.Callback):
    """Write the LoRA as ``<dirpath>/pytorch_lora_weights.safetensors`` (for ``pipeline.load_lora_weights``),
    or a fully fine-tuned UNet as ``<dirpath>/unet/`` (for ``UNet2DConditionModel.from_pretrained``).

    Each run exports into its own folder, next to its checkpoints; the final export replaces only the final
    weights, never the ``step_<N>`` exports beside them. A failed export never costs a checkpoint: the error
    is raised once the checkpoints of that step are written (Lightning runs ``ModelCheckpoint`` after the
    other callbacks), at the start of the next batch or at the end of training.

    Args:
        dirpath: output folder; default ``<run folder>/lora``, the run folder being the one that holds its
            ``checkpoints/`` (``<save_dir>/<name>/version_N`` for CSV, ``<save_dir>/<project>/<run id>`` for
            W&B, ``default_root_dir`` without a logger).
        every_n_train_steps: also export every N optimizer steps into ``<dirpath>/step_<N>``.
        at_train_end: export the final weights into ``dirpath`` when training ends.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int | None = None, at_train_end: bool = True) -> None:
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.at_train_end = at_train_end
        self._last_exported_step = -1
        self._failure: BaseException | None = None

    def _dir(self, trainer: L.Trainer) -> str:
        return self.dirpath or os.path.join(run_dir(trainer), "lora")

    def _raise_pending(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, n = trainer.global_step, self.every_n_train_steps
        if n and step > 0 and step % n == 0 and step != self._last_exported_step:
            self._last_exported_step = step  # a skipped (non-finite) batch leaves global_step unchanged
            if trainer.is_global_zero:  # file export on rank 0 only; the weights are identical on all ranks
                try:
                    export_trained_weights(pl_module.generator, os.path.join(self._dir(trainer), f"step_{step}"))
                except Exception as e:  # noqa: BLE001 - re-raised after this step's checkpoint is written
                    self._failure = e

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._raise_pending()

    def on_train_end(self, trainer, pl_module) -> None:
        self._raise_pending()
        if self.at_train_end and trainer.is_global_zero:
            export_trained_weights(pl_module.generator, self._dir(trainer))
