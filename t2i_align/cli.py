"""The ``t2i-align`` command: a LightningCLI (fit / validate / test / predict, --print_config).

Configs compose by stacking ``--config`` files from ``configs/`` (trainer, model, method, data, logger,
experiment); any key can be overridden on the command line (``--model.init_args.seed=3``).
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from t2i_align.lightning_modules.base import AlignmentModule


class RunConfigCallback(SaveConfigCallback):
    """Save the resolved config inside the run's own folder and hand it to the loggers.

    Lightning's default writes ``<log_dir>/config.yaml``; with ``WandbLogger`` that is the working
    directory, so the second run (or sweep trial) started there crashes on the existing file. Here the
    file goes to the W&B run folder (uploaded with the run) or the CSV/TensorBoard version folder.
    In the W&B run folder it is named ``lightning_config.yaml``: W&B owns ``files/config.yaml`` there and
    rewrites it with its own config record when an online run finishes or an offline run is synced.
    """

    wandb_config_filename = "lightning_config.yaml"

    def __init__(self, parser, config, config_filename: str = "config.yaml", overwrite: bool = True, multifile: bool = False):
        super().__init__(parser, config, config_filename, overwrite, multifile, save_to_log_dir=False)

    def save_config(self, trainer, pl_module, stage: str) -> None:  # rank 0 only
        config = self.config.as_dict()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run_dir, filename = logger.experiment.dir, self.wandb_config_filename
                logger.experiment.config.update(config, allow_val_change=True)
            else:
                run_dir, filename = logger.log_dir, self.config_filename
                logger.log_hyperparams(config)
            if run_dir:
                os.makedirs(run_dir, exist_ok=True)
                self.parser.save(self.config, os.path.join(run_dir, filename), skip_none=False, overwrite=True)
        if not trainer.loggers:
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            path = os.path.join(trainer.default_root_dir, self.config_filename)
            self.parser.save(self.config, path, skip_none=False, overwrite=True)


class T2ICLI(LightningCLI):
    """LightningCLI with the project's defaults: any :class:`AlignmentModule` method, any datamodule
    (``t2i_align.datamodules.T2IDataModule`` for training, ``BenchmarkExportData`` for ``predict`` exports), atomic
    checkpoint writes and the run-folder config callback."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        trainer_defaults = {"plugins": {"class_path": "t2i_align.io.AtomicCheckpointIO"}}
        trainer_defaults.update(kwargs.pop("trainer_defaults", {}))
        super().__init__(
            AlignmentModule,
            L.LightningDataModule,
            *args,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults,
            **kwargs,
        )


def main(args: list[str] | None = None) -> None:
    T2ICLI(args=args)


if __name__ == "__main__":
    main()
