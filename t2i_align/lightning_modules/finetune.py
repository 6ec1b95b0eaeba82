"""``Finetune``: the plain noise-prediction loss on image-caption pairs.

This is the "fine-tune with L_LDM only" baseline of TokenCompose's ablation, and the L_pre term that
the reward methods add on real pairs.
"""

from __future__ import annotations

from t2i_align.lightning_modules.base import AlignmentModule, batch_pairs

__all__ = ["Finetune"]


class Finetune(AlignmentModule):
    """Noise-prediction (epsilon or v) MSE on image-caption pairs (validation: the base class's held-out loss)."""

    def training_step(self, batch: dict, batch_idx: int):
        pairs = batch_pairs(batch, "Finetune")
        loss = self.generator.denoising_loss(pairs["pixel_values"], pairs["captions"], self.step_rng(),
                                           caption_dropout=self.caption_dropout)
        return self.finish_step(loss, batch_size=len(pairs["captions"]))
