"""``StepCheckpoint``: Lightning's ``ModelCheckpoint`` that never loses the final steps of a run; ``SaveOnSigterm``: a
checkpoint and a non-zero exit when a scheduler stops the run."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from t2i_align.runs import run_dir

#: Exit status of a run stopped by SIGTERM (the shell's convention for a process ended by signal 15).
SIGTERM_EXIT_CODE = 143


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


class SaveOnSigterm(Callback):
    """On SIGTERM (a scheduler's time limit or preemption), save a checkpoint of the last finished step and stop the
    run with exit status 143 (128 + SIGTERM), so the scheduler sees that the job did not finish.

    Lightning notes SIGTERM and raises ``SIGTERMException`` at the next step boundary on every rank (after the
    step's callbacks ran), but that exception is a ``SystemExit`` without a code: the process used to exit 0 having
    saved nothing since the last periodic checkpoint. Here the checkpoint is written at that boundary into the run's
    ``checkpoints/`` folder as ``sigterm-step=<N>.ckpt``; ``--ckpt_path last`` (or ``last_or_new`` in a requeue
    script) resumes it, and the final export is written when the resumed run ends.
    """

    def __init__(self) -> None:
        self.saved: Path | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = SIGTERM_EXIT_CODE
        if trainer.state.fn != TrainerFn.FITTING:  # validate / predict: an export resumes by skipping finished files
            rank_zero_info(f"SIGTERM: stopped during {trainer.state.fn}; run the same command again to finish")
            return
        # also when the signal came during validation: the weights are those of the last finished step
        periodic = trainer.checkpoint_callback  # next to the run's periodic checkpoints, where `last` looks
        folder = Path(periodic.dirpath) if periodic is not None and periodic.dirpath else run_dir(trainer) / "checkpoints"
        self.saved = folder / f"sigterm-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(self.saved)  # collective: every rank calls it, rank 0 writes (atomically)
        rank_zero_info(f"SIGTERM: saved {self.saved} at step {trainer.global_step}; resume with the same command and "
                       "--ckpt_path last")
