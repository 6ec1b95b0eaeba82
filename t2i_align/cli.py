"""The ``t2i-align`` command: a LightningCLI (fit / validate / test / predict, --print_config).

Configs compose by stacking ``--config`` files from ``configs/`` (trainer, model, method, data, logger,
experiment); any key can be overridden on the command line (``--model.init_args.seed=3``).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar, Timer, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from t2i_align.callbacks.checkpoint import SaveOnSigterm
from t2i_align.common import ConfigError, UserError
from t2i_align.io import atomic_path, clean_stale_temporaries, load_checkpoint_file
from t2i_align.lightning_modules.base import AlignmentModule
from t2i_align.runs import (
    CONFIG_KEY,
    WANDB_RUN_KEY,
    continue_wandb_run,
    is_checkpoint_file_path,
    key_list,
    output_roots,
    record_differences,
    recorded_wandb_run,
    remove_unused_run_dir,
    resolve_ckpt_path,
    resolve_once,
)

DESCRIPTION = (
    "Fine-tune text-to-image diffusion models for text-image alignment (ReFL, ARL, ... on SD 1.x/2.x, SDXL "
    "and ToyWorld) and compare them. Stack YAML files with --config (configs/trainer, method, model, data, logger, "
    "experiment); `t2i-align fit --config ... --help` describes every parameter of the chosen classes. "
    "--ckpt_path last resumes the newest checkpoint of the run (last_or_new: or starts a new one); "
    "--ckpt_path fork:X.ckpt continues from a checkpoint of another configuration with this one's settings."
)


#: Set to 1 for full tracebacks and jsonargparse's complete messages instead of the one-line errors.
DEBUG_ENV = "T2I_ALIGN_DEBUG"


def debug_mode() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def short_parse_error(message: str) -> str:
    """jsonargparse's nested message in one line: the dotted key (as nested ``Parser key``s name it) and the
    innermost complaint, e.g. ``model.optimizer.lr: expected a float or a Tensor, got 'fast'``."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines()]
    expected = [m for line in lines for m in re.findall(r"Expected a <class '([\w.]+)'>", line) if m != "NoneType"]
    complaints = [line for line in lines if line and not line.startswith((
        "Parser key", "Does not validate", "Subtypes:", "Errors:", "Given value", "Problem with given class_path",
        "Expected a <class", "Expected a dot import path", "Expected a path but", "Type typing."))]
    given = re.findall(r"Given value: (.*?)(?:\. Got value:|$)", message, flags=re.M)
    where = ".".join(keys)
    if complaints:
        what = complaints[-1]
    elif expected:
        what = "expected " + " or ".join(dict.fromkeys(e.rsplit(".", 1)[-1] for e in expected))
        if given:
            what += f", got {given[0].strip()!r}"
    else:
        return " ".join(line for line in lines if line)
    return f"{where}: {what}" if where else what


class T2IArgumentParser(LightningArgumentParser):
    """Parse errors in one line that names the key (jsonargparse's full message with T2I_ALIGN_DEBUG=1)."""

    def error(self, message: str, ex: Exception | None = None):
        if debug_mode() or not self.exit_on_error:
            return super().error(message, ex)
        self._logger.error(message)
        sys.stderr.write(f"t2i-align: error: {short_parse_error(message)} (`{self.prog.replace(' [options]', '')} "
                         f"--help` lists the options; {DEBUG_ENV}=1 shows the full message)\n")
        self.exit(2)


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_noise() -> None:
    """Silence messages that need no action from a t2i-align user (docs/configs.md, "Messages")."""
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


def check_folder_is_this_runs(config_file: str, config: dict[str, Any]) -> None:
    """Without a logger every run writes ``config.yaml``, ``checkpoints/`` and ``lora/`` straight into
    ``default_root_dir``: refuse a folder that already holds a run of another ``model``/``data`` config (a resume
    of the same run may write there again)."""
    if not os.path.isfile(config_file):
        return
    with open(config_file) as f:
        recorded = yaml.safe_load(f) or {}
    differing = record_differences(recorded, config_record(config))
    if differing:
        raise ConfigError(
            f"{config_file} belongs to another run ({key_list(differing)} differ), and without a logger both runs would write their config, checkpoints and export into "
            f"{os.path.dirname(config_file)}: give this run its own trainer.default_root_dir or add a logger"
        )


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
        if not trainer.loggers:  # the run folder is default_root_dir itself: one run (and its resumes) per folder
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            if stage == "fit":
                path = os.path.join(trainer.default_root_dir, self.config_filename)
                check_folder_is_this_runs(path, config)
            else:  # validate / predict of a trained run beside it: keep the training's config.yaml
                path = os.path.join(trainer.default_root_dir, f"{stage}_{self.config_filename}")
            self.parser.save(self.config, path, skip_unset=False, overwrite=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._record is None:  # the config does not change during a run
            self._record = config_record(self.plain_config())
        checkpoint[CONFIG_KEY] = self._record
        for logger in trainer.loggers:  # the W&B run a resume continues (runs.continue_wandb_run)
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                checkpoint[WANDB_RUN_KEY] = logger.version


class T2ICLI(LightningCLI):
    """LightningCLI with the project's defaults: any :class:`AlignmentModule` method, any datamodule
    (``t2i_align.datamodules.T2IDataModule`` for training, ``BenchmarkExportData`` for ``predict`` exports),
    atomic checkpoint writes, the run-folder config callback, and runs that resume, fail and clean up
    predictably (``--ckpt_path last``; see :mod:`t2i_align.runs`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        kwargs.setdefault("parser_class", T2IArgumentParser)
        # The methods draw every random number from their own `seed`; one global seed for anything else.
        kwargs.setdefault("seed_everything_default", 0)
        parser_kwargs = kwargs.pop("parser_kwargs", {}) or {}
        parser_kwargs.setdefault("description", DESCRIPTION)
        parser_kwargs.setdefault("prog", "t2i-align")  # also under `python -m t2i_align.cli`
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

    def instantiate_classes(self) -> None:
        # The configured classes check their arguments in their constructors (ValueError naming the argument): a
        # ValueError raised there is a mistake in the config, shown in one line, not a bug.
        try:
            super().instantiate_classes()
        except Exception as e:  # noqa: BLE001 - re-raised as it is unless a constructor refused a value
            refused = constructor_refusal(e)
            if refused is None or user_error(e) is not None:
                raise
            raise ConfigError(str(refused)) from e

    def parse_arguments(self, parser, args) -> None:
        check_config_files(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if is_checkpoint_file_path(ckpt_path):
            # LightningCLI reads the file right after parsing: fail first with one clear sentence.
            load_checkpoint_file(ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        # Every run saves and exits non-zero on SIGTERM (callbacks.checkpoint.SaveOnSigterm).
        # Lightning's rich bar prints "Epoch 0/-2" for step-bounded runs (max_epochs = -1): default to tqdm.
        config = self._get(self.config_init, "trainer", default={})
        accelerator = config.get("accelerator")
        if isinstance(accelerator, str) and accelerator.lower() in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator}, but torch sees no CUDA device (a CPU-only torch "
                              "build, no driver, or CUDA_VISIBLE_DEVICES hides them); use cpu or auto")
        callbacks = list(config.get("callbacks") or [])
        extra = [] if any(isinstance(c, SaveOnSigterm) for c in callbacks) else [SaveOnSigterm()]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            extra.append(TQDMProgressBar())
        if extra:
            kwargs["callbacks"] = [*kwargs.get("callbacks", callbacks), *extra]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        check_training_ends(self.trainer)

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
        record = config_record(dump, sections)

        def resolve() -> tuple[str | None, str | None]:  # on rank 0 only, shared with every rank (resolve_once)
            path = resolve_ckpt_path(kwargs.get("ckpt_path"), trainer, record, subcommand, model)
            return path, recorded_wandb_run(path) if subcommand == "fit" else None

        kwargs["ckpt_path"], wandb_run = resolve_once(trainer, resolve)
        continue_wandb_run(trainer, wandb_run)
        try:
            with warnings.catch_warnings():
                if subcommand != "fit":  # callback states (checkpointing, EMA) matter only to a resumed fit
                    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used")
                getattr(trainer, subcommand)(model, **kwargs)
        except BaseException:
            remove_unused_run_dir(trainer)  # after Lightning's own failure handling wrote its last files
            raise


def check_training_ends(trainer: L.Trainer) -> None:
    """Training reads endless streams (datamodules.sampler), so an epoch never ends by itself: a fit must be bounded
    by ``max_steps``, by ``max_epochs`` with an integer ``limit_train_batches`` (ARL's rounds) or by ``max_time``."""
    limit = trainer.limit_train_batches
    bounded_epochs = isinstance(limit, int) and not isinstance(limit, bool) and limit > 0
    timed = any(isinstance(c, Timer) for c in trainer.callbacks)  # trainer.max_time adds a Timer
    if trainer.max_steps == -1 and not bounded_epochs and not timed:
        raise ConfigError(
            "trainer.max_steps is not set: training streams never end, so max_epochs alone would run forever; set "
            "trainer.max_steps (or max_epochs with an integer trainer.limit_train_batches, or trainer.max_time)"
        )


def check_config_files(args) -> None:
    """Each ``--config`` file exists and is valid YAML, else one sentence naming the file and line (jsonargparse
    reports a YAML error without the file's name)."""
    args = [str(a) for a in args]
    files = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config", "-c")]
    files += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    named: list[tuple[str, str]] = []  # (config file, method class name) in stacking order
    for path in files:
        if not os.path.isfile(path):
            raise UserError(f"config file {path}: no such file")
        try:
            with open(path) as f:
                content = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
            raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        model = content.get("model") if isinstance(content, dict) else None
        class_path = model.get("class_path") if isinstance(model, dict) else None
        if isinstance(class_path, str):
            named.append((path, class_path.rsplit(".", 1)[-1]))
    # A method config (configs/method/*.yaml) chooses the method, and a later one replaces an earlier one; any other
    # file that names a method (an experiment overlay) belongs to that method and must agree with the final choice.
    choosers = [(path, method) for path, method in named if Path(path).parent.name == "method"] or named[-1:]
    for path, method in named:
        if (path, method) not in choosers and method != choosers[-1][1]:
            raise UserError(f"{path} is an overlay for {method}, but the stacked configs train {choosers[-1][1]} "
                            f"({choosers[-1][0]}); stack it with configs/method/ of its own method")


def _chain(exception: BaseException) -> list[BaseException]:
    seen, pending, out = set(), [exception], []
    while pending:
        e = pending.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        pending += [e.__cause__, e.__context__]
    return out


def constructor_refusal(exception: BaseException) -> ValueError | None:
    """The ValueError a configured class raised while jsonargparse built it (jsonargparse wraps it in its own)."""
    for e in _chain(exception):
        frames = traceback.extract_tb(e.__traceback__)
        if isinstance(e, ValueError) and frames and "jsonargparse" not in frames[-1].filename:
            return e
    return None


def user_error(exception: BaseException) -> BaseException | None:
    """The user-facing cause of a failure, if any: a :class:`UserError` anywhere in the exception's chain (jsonargparse
    wraps errors raised while building the configured classes), or Lightning's misconfiguration errors."""
    return next((e for e in _chain(exception) if isinstance(e, (UserError, MisconfigurationException))), None)


#: Folder where the ranks of one command leave their error line for rank 0 (set by the first process; the ranks that
#: Lightning launches on this machine inherit it).
ERROR_DIR_ENV = "T2I_ALIGN_ERROR_DIR"
#: How long rank 0 waits for another rank's error line after a failure of its own that is not the user's.
PEER_ERROR_WAIT_S = 10.0


def failure_line(exception: BaseException) -> str:
    cause = user_error(exception)
    if cause is not None:
        return str(cause)
    return f"{type(exception).__name__}: {str(exception).strip().splitlines()[0] if str(exception).strip() else ''}"


def report_to_rank_zero(rank: int, line: str) -> None:
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder and os.path.isdir(folder):
        with atomic_path(Path(folder) / f"rank{rank}.txt") as tmp:
            tmp.write_text(line)


def peer_failure(own_rank: int) -> str | None:
    """The first error line another rank reported (waiting up to PEER_ERROR_WAIT_S for it), or None."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return None
    deadline = time.monotonic() + PEER_ERROR_WAIT_S
    while True:
        reports = sorted(Path(folder).glob("rank*.txt"), key=lambda f: int(f.stem[4:]))
        reports = [f for f in reports if f.stem != f"rank{own_rank}"]
        if reports:
            return f"{reports[0].stem.replace('rank', 'rank ')} failed: {reports[0].read_text().strip()}"
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def main(args: list[str] | None = None) -> None:
    """The command. Errors in what the user gave (config values, files, folders, checkpoints, environment) print one
    line ``t2i-align: error: ...`` and exit 1; other errors are bugs and keep their traceback. From Python
    (``args`` given) or with T2I_ALIGN_DEBUG=1, every exception propagates unchanged.

    Under DDP the rank that failed first tells the others (``T2I_ALIGN_ERROR_DIR``): when rank 0 then fails on a
    closed connection, its last line is that rank's error, not its own traceback."""
    quiet_known_noise()
    if args is None and ERROR_DIR_ENV not in os.environ:
        os.environ[ERROR_DIR_ENV] = folder = tempfile.mkdtemp(prefix="t2i-align-errors-")
        atexit.register(shutil.rmtree, folder, True)
    try:
        T2ICLI(args=args)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the user's to fix
        if args is not None or debug_mode():
            raise
        rank = rank_zero_only.rank or 0
        if rank != 0:
            report_to_rank_zero(rank, failure_line(e))
        cause = user_error(e)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()  # until exit
        if cause is None and rank == 0 and distributed:
            peer = peer_failure(rank)
            if peer is not None:  # rank 0's own failure is the consequence: one line, then the cause
                print(f"t2i-align: rank 0 stopped too ({failure_line(e)[:200]})", file=sys.stderr)
                sys.exit(f"t2i-align: error: {peer}")
        if cause is None:
            raise
        sys.exit(f"t2i-align: error: {cause}")


if __name__ == "__main__":
    main()
