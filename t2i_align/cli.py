"""The ``t2i-align`` command: a LightningCLI (fit / validate / test / predict, --print_config).

Configs compose by stacking ``--config`` files from ``configs/`` (trainer, model, method, data, logger,
experiment); any key can be overridden on the command line (``--model.init_args.seed=3``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from t2i_align.io import CheckpointError, clean_stale_temporaries, load_checkpoint_file
from t2i_align.lightning_modules.base import AlignmentModule
from t2i_align.runs import (
    CONFIG_KEY,
    is_checkpoint_file_path,
    output_roots,
    remove_unused_run_dir,
    resolve_ckpt_path,
)

DESCRIPTION = (
    "Fine-tune text-to-image diffusion models for text-image alignment (ReFL, ARL, ... on SD 1.x/2.x and "
    "ToyWorld) and compare them. Stack YAML files with --config (configs/trainer, method, model, data, logger, "
    "experiment); `t2i-align fit --config ... --help` describes every parameter of the chosen classes. "
    "--ckpt_path last resumes the newest checkpoint of the run (last_or_new: or starts a new one)."
)


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_noise() -> None:
    """Silence messages that need no action from a t2i-align user (README, "Messages")."""
    # The frozen text encoder, VAE and experts are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # A resumed run writes into a new version folder by design (t2i_align.runs); best-k bookkeeping is not used.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from .* won't be reloaded")
    # Manual optimisation (CoMat): checkpoints should hold the state after the step, which is what a resumed run
    # continues from; Lightning suggests saving the state before it instead.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
    # Lightning's own pytree code on torch >= 2.10; nothing a user can change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropLightningTip())  # an advertisement for a cloud logger


def config_record(config_dump: dict[str, Any], sections: tuple[str, ...] = ("model", "data")) -> dict[str, Any]:
    """The part of a resolved config that defines what a run trains (stored in its checkpoints)."""
    return {key: config_dump.get(key) for key in sections}


class RunConfigCallback(SaveConfigCallback):
    """Save the resolved config inside the run's own folder, hand it to the loggers, and record its
    ``model`` and ``data`` sections in every checkpoint (``--ckpt_path last`` matches runs by them).

    Lightning's default writes ``<log_dir>/config.yaml``; with ``WandbLogger`` that is the working
    directory, so the second run (or sweep trial) started there crashes on the existing file. Here the
    file goes to the W&B run folder (uploaded with the run) or the CSV/TensorBoard version folder.
    In the W&B run folder it is named ``lightning_config.yaml``: W&B owns ``files/config.yaml`` there and
    rewrites it with its own config record when an online run finishes or an offline run is synced.
    """

    wandb_config_filename = "lightning_config.yaml"

    def __init__(self, parser, config, config_filename: str = "config.yaml", overwrite: bool = True, multifile: bool = False):
        super().__init__(parser, config, config_filename, overwrite, multifile, save_to_log_dir=False)
        self._record: dict | None = None

    def plain_config(self) -> dict[str, Any]:
        """The resolved config as plain YAML types (no ``!!python/object`` tags in ``hparams.yaml``)."""
        return yaml.safe_load(self.parser.dump(self.config, skip_unset=False))

    def save_config(self, trainer, pl_module, stage: str) -> None:  # rank 0 only
        config = self.plain_config()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run_dir, filename = logger.experiment.dir, self.wandb_config_filename
                logger.experiment.config.update(config, allow_val_change=True)
            else:
                run_dir, filename = logger.log_dir, self.config_filename
                logger.log_hyperparams(config)
            if run_dir:
                os.makedirs(run_dir, exist_ok=True)
                self.parser.save(self.config, os.path.join(run_dir, filename), skip_unset=False, overwrite=True)
        if not trainer.loggers:
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            path = os.path.join(trainer.default_root_dir, self.config_filename)
            self.parser.save(self.config, path, skip_unset=False, overwrite=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._record is None:  # the config does not change during a run
            self._record = config_record(self.plain_config())
        checkpoint[CONFIG_KEY] = self._record


class T2ICLI(LightningCLI):
    """LightningCLI with the project's defaults: any :class:`AlignmentModule` method, any datamodule
    (``t2i_align.datamodules.T2IDataModule`` for training, ``BenchmarkExportData`` for ``predict`` exports),
    atomic checkpoint writes, the run-folder config callback, and runs that resume, fail and clean up
    predictably (``--ckpt_path last``; see :mod:`t2i_align.runs`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        # The methods draw every random number from their own `seed`; one global seed for anything else.
        kwargs.setdefault("seed_everything_default", 0)
        parser_kwargs = kwargs.pop("parser_kwargs", {}) or {}
        parser_kwargs.setdefault("description", DESCRIPTION)
        trainer_defaults = {"plugins": {"class_path": "t2i_align.io.AtomicCheckpointIO"}}
        trainer_defaults.update(kwargs.pop("trainer_defaults", {}))
        super().__init__(
            AlignmentModule,
            L.LightningDataModule,
            *args,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults,
            parser_kwargs=parser_kwargs,
            **kwargs,
        )

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if is_checkpoint_file_path(ckpt_path):
            # LightningCLI reads the file right after parsing: fail first with one clear sentence.
            load_checkpoint_file(ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        # Lightning's rich bar prints "Epoch 0/-2" for step-bounded runs (max_epochs = -1): default to tqdm.
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, TQDMProgressBar()])
        return super().instantiate_trainer(**kwargs)

    # The subcommands (LightningCLI calls a method of this name instead of the trainer's when there is one).
    def fit(self, model, **kwargs) -> None:
        self._run("fit", model, **kwargs)

    def validate(self, model, **kwargs) -> None:
        self._run("validate", model, **kwargs)

    def test(self, model, **kwargs) -> None:
        self._run("test", model, **kwargs)

    def predict(self, model, **kwargs) -> None:
        self._run("predict", model, **kwargs)

    def _run(self, subcommand: str, model, **kwargs) -> None:
        trainer = self.trainer
        sections = ("model", "data") if subcommand == "fit" else ("model",)
        dump = yaml.safe_load(self.parser.dump(self.config, skip_unset=False))[subcommand]
        if trainer.is_global_zero:  # before this run writes anything; other ranks have not started writing
            clean_stale_temporaries(output_roots(trainer, self.datamodule))
        kwargs["ckpt_path"] = resolve_ckpt_path(kwargs.get("ckpt_path"), trainer, config_record(dump, sections))
        try:
            with warnings.catch_warnings():
                if subcommand != "fit":  # callback states (checkpointing, EMA) matter only to a resumed fit
                    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used")
                getattr(trainer, subcommand)(model, **kwargs)
        except BaseException:
            remove_unused_run_dir(trainer)  # after Lightning's own failure handling wrote its last files
            raise


def main(args: list[str] | None = None) -> None:
    quiet_known_noise()
    try:
        T2ICLI(args=args)
    except CheckpointError as e:  # one sentence that names the file; the traceback adds nothing
        if args is not None:  # called from Python (tests, scripts): keep the exception
            raise
        sys.exit(f"t2i-align: error: {e}")


if __name__ == "__main__":
    main()
