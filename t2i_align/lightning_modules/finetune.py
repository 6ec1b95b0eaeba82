"""``Finetune``: the plain noise-prediction loss on image-caption pairs.

This is the "fine-tune with L_LDM only" baseline of TokenCompose's ablation, and the L_pre term that
the reward methods add on real pairs.
"""

from __future__ import annotations

from t2i_align.lightning_modules.base import AlignmentModule, pair_batch

__all__ = ["Finetune", "pair_batch"]


class Finetune(AlignmentModule):
    """Noise-prediction (epsilon or v) MSE on image-caption pairs (validation: the base class's held-out loss)."""

    def training_step(self, batch: dict, batch_idx: int):
        pairs = pair_batch(batch)
        loss = self.generator.denoising_loss(pairs["pixel_values"], pairs["captions"], self.step_rng())
        loss = self.guard_nonfinite(loss)
        if loss is not None:
            self.log("train/loss", loss, prog_bar=True, batch_size=len(pairs["captions"]))
        return loss
