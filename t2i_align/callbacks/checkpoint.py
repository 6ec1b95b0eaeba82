"""``StepCheckpoint``: Lightning's ``ModelCheckpoint`` that never loses the final steps of a run."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that also saves at the end of every training epoch whose last step
    was not saved yet.

    Training here is bounded by ``max_steps`` over endless streams, so the epoch ends exactly when training
    does (ARL: at the end of each round). Lightning's own class saves only every ``every_n_train_steps``: with
    ``max_steps=25`` and ``every_n_train_steps=10`` the last five steps were never saved and ``last.ckpt`` held
    step 20. The end-of-epoch save comes before any ``on_train_end`` hook, so neither a callback that swaps
    weights there (``TrainableEMA(apply_at_end=True)``) nor a failing export can change or skip it.
    """

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step that is already saved
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
