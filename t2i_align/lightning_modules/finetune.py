"""``Finetune``: the plain noise-prediction loss on image-caption pairs.

This is the "fine-tune with L_LDM only" baseline of TokenCompose's ablation, and the L_pre term that
the reward methods add on real pairs.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from t2i_align.common import derive_seed
from t2i_align.lightning_modules.base import AlignmentModule


def pair_batch(batch: dict) -> dict:
    """The pair part of a batch (the batch itself, or ``batch["pairs"]`` when prompts come too)."""
    return batch["pairs"] if "pairs" in batch else batch


class Finetune(AlignmentModule):
    """Noise-prediction (epsilon or v) MSE on image-caption pairs; validation reports the same loss at
    per-sample fixed noise and timesteps, so it is comparable across runs and world sizes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.val_loss = MeanMetric()

    def training_step(self, batch: dict, batch_idx: int):
        pairs = pair_batch(batch)
        loss = self.generator.denoising_loss(pairs["pixel_values"], pairs["captions"], self.step_rng())
        loss = self.guard_nonfinite(loss)
        if loss is not None:
            self.log("train/loss", loss, prog_bar=True, batch_size=len(pairs["captions"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if "pixel_values" not in batch:
            return  # prompt-only validation sets are for the evaluation callbacks
        for pixels, caption, sample_id in zip(batch["pixel_values"], batch["captions"], batch["ids"]):
            # noise and timestep fixed by the sample id: independent of batch size and rank
            rng = torch.Generator("cpu").manual_seed(derive_seed(self.seed, "val", sample_id))
            loss = self.generator.denoising_loss(pixels[None], [caption], rng)
            self.val_loss.update(loss)

    def on_validation_epoch_end(self) -> None:
        # compute() on every rank (it all-gathers); a rank with no validation samples still joins.
        value = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/denoise_loss", value, sync_dist=False)
