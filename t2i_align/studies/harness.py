"""What every ToyWorld study does: its models, training them, finding their checkpoints and the one cached
evaluation pass.

* A :class:`Model` is a name, a ``--config`` stack, the run folder its fit writes and the checkpoint evaluated;
  :data:`BASE` is the committed base pipeline, defined here once.
* :func:`fit` and :func:`evaluate` run ``t2i-align fit`` / ``t2i-align validate`` (:mod:`t2i_align.cli`) in a child
  process, both of them (see :func:`run_cli` for why).
* :func:`evaluate` is the only evaluation pass: every metric of ``configs/eval/toyworld.yaml``, or the callbacks
  given instead (:func:`toy_pass_callbacks`: the toy metrics with every image's verdicts). Its result is reused only
  for the same request: see :func:`evaluation_key`.

Studies run from the repository root: config paths are relative to it, runs go to ``runs/``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from t2i_align.io import atomic_path
from t2i_align.runs import RUNTIME_KEYS

EVAL_CONFIG = "configs/eval/toyworld.yaml"
VAL_CONFIG = "configs/eval/toyworld_val.yaml"
TOYWORLD = "configs/experiment/toyworld.yaml"
FINETUNE = "configs/method/finetune.yaml"
#: Where the evaluation passes are kept: ``<EVALUATIONS>/<model slug>/<label>_<key digest>/``.
EVALUATIONS = Path("runs/compare")
TOY_CALLBACK = "ToyWorldEvaluation"


@dataclass(frozen=True)
class Model:
    """A model of a study.

    Args:
        name: its name in tables and in the results file.
        configs: its ``--config`` stack, as the last file's header gives it.
        run_dir: the folder its fit writes (the stack's ``trainer.default_root_dir``); None when it is not trained.
        checkpoint: the weights evaluated; None: the stack's own starting weights.
        overrides: command-line arguments after the stack (``--model.init_args.seed=1``): see :func:`training_seed`.
    """

    name: str
    configs: tuple[str, ...]
    run_dir: str | None = None
    checkpoint: str | None = None
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "configs", tuple(self.configs))
        object.__setattr__(self, "overrides", tuple(self.overrides))

    def args(self) -> list[str]:
        """Its command-line arguments: the ``--config`` stack, then the overrides."""
        return [*config_args(self.configs), *self.overrides]

    def replace(self, **changes: Any) -> Model:
        return dataclasses.replace(self, **changes)

    @property
    def slug(self) -> str:
        """The name as a folder name (``CA+FP (step 100)`` -> ``ca_fp_step_100``)."""
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_") or "model"


#: The committed base pipeline: Finetune's LoRA starts at zero, so its stack without a checkpoint is the base. Every
#: study's "before".
BASE = Model("Base", (FINETUNE, TOYWORLD))


def config_args(configs: Sequence[str]) -> list[str]:
    return [arg for config in configs for arg in ("--config", config)]


def training_seed(model: Model, seed: int) -> Model:
    """``model`` trained again with training seed ``seed`` (one training run per arm measures sampling noise only):
    the method's random streams (``model.init_args.seed``: noise, timesteps, sampled candidates) and the data order
    (``data.init_args.seed``) are both ``seed``, in their own run folder (``<run_dir>_seed<seed>``, where the
    logger writes too) and named ``<name> (training seed <seed>)``. Seed 0 is ``model`` itself: the configs' own
    seeds (every study config leaves both at 0)."""
    if seed == 0:
        return model
    if model.run_dir is None:
        raise ValueError(f"{model.name}: a model that is not trained has no training seed")
    run_dir = f"{model.run_dir}_seed{seed}"
    overrides = (*model.overrides, f"--model.init_args.seed={seed}", f"--data.init_args.seed={seed}",
                 f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}")
    return model.replace(name=f"{model.name} (training seed {seed})", run_dir=run_dir, overrides=overrides)


# ------------------------------------------------------------------------------------------------ the CLI
def run_cli(subcommand: str, args: Sequence[str]) -> tuple[str, float]:
    """Run ``t2i-align <subcommand> <args>`` to completion; returns the command (as a user types it) and its wall
    time in seconds.

    Fit and validate both run in a child process (``python -m t2i_align.cli`` of this interpreter), never in this
    one: under DDP Lightning starts the other ranks by running the current command again
    (``lightning.pytorch.strategies.launchers.subprocess_script``), which would be the whole study, not one fit; a
    run's global state (seeds, signal handlers of ``SaveOnSigterm``, warning filters, GPU memory) ends with its
    process instead of leaking into the next model's; and the recorded command is exactly what ran. Numbers come
    back through files: the fit's ``toy_eval.json``, the evaluation's :class:`MetricsFile`.
    """
    start = time.time()
    subprocess.run([sys.executable, "-m", "t2i_align.cli", subcommand, *args], check=True)
    return shlex.join(["t2i-align", subcommand, *args]), round(time.time() - start, 1)


class MetricsFile(L.Callback):
    """Writes the logged validation metrics (``val/`` removed from the names) to ``path`` as JSON when validation
    ends, on rank 0: how an evaluation in a child process hands its numbers back. Listed last, after the
    evaluation callbacks whose metrics it writes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items()}
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ training runs
def toy_eval(run_dir: str | Path) -> dict:
    """The fit's own before/after toy metrics (``ToyWorldEvaluation(evaluate_before_fit=True)``)."""
    return json.loads((Path(run_dir) / "toy_eval.json").read_text())


def fit(model: Model, args: Sequence[str] = (), retrain: bool = False, min_step: int | None = None) -> dict:
    """Train ``model`` (its stack, then ``args``) unless its run folder holds a finished fit: a ``toy_eval.json``
    (of at least ``min_step`` steps when given; a longer run's checkpoints up to ``min_step`` are those of a run of
    ``min_step`` at a constant learning rate). The wall time is kept in ``<run_dir>/fit_seconds.json`` for later
    tables. Returns ``{"command", "seconds"}`` (seconds None: a run of an earlier version that did not keep it)."""
    if model.run_dir is None:
        raise ValueError(f"{model.name}: no run folder to train into")
    run_dir = Path(model.run_dir)
    report, timing = run_dir / "toy_eval.json", run_dir / "fit_seconds.json"
    args = [*model.args(), *args]
    finished = report.exists() and (min_step is None or toy_eval(run_dir)["step"] >= min_step)
    command = shlex.join(["t2i-align", "fit", *args])
    if retrain or not finished:
        command, seconds = run_cli("fit", args)
        with atomic_path(timing) as tmp:
            tmp.write_text(json.dumps({"seconds": seconds}) + "\n")
    seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else None
    return {"command": command, "seconds": seconds}


def checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The newest logger version's (``logs/version_<N>``, numeric order) ``last.ckpt``, or its checkpoint of
    ``step`` (``ModelCheckpoint``'s ``...step=<step>.ckpt``)."""
    name = "last.ckpt" if step is None else f"*step={step}.ckpt"
    found = sorted(Path(run_dir).glob(f"logs/version_*/checkpoints/{name}"),
                   key=lambda p: int(p.parts[-3].split("_")[1]))
    if not found:
        what = "last.ckpt" if step is None else f"checkpoint of step {step}"
        raise FileNotFoundError(f"{run_dir}: no {what} under logs/version_*/checkpoints (did the fit finish?)")
    return found[-1]


def load_module(model: Model) -> L.LightningModule:
    """``model``'s LightningModule in this process, in eval mode: built from its stack by the CLI (nothing run) with
    its checkpoint's trained weights loaded as ``validate --ckpt_path`` would (``on_load_checkpoint`` checks that
    they are this stack's). For measurements that need the module itself (attention maps, edits)."""
    import torch

    from t2i_align.cli import T2ICLI
    from t2i_align.io import load_checkpoint_file

    with warnings.catch_warnings():  # args given while the study has its own command line: on purpose
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        module = T2ICLI(args=[*model.args(), "--trainer.logger=false"], run=False).model
    if model.checkpoint is not None:
        checkpoint = load_checkpoint_file(model.checkpoint)
        module.on_load_checkpoint(checkpoint)
        with torch.no_grad():
            module.load_state_dict(checkpoint["state_dict"], strict=False)
    return module.eval()


# --------------------------------------------------------------------------------------- evaluation pass
def toy_pass_callbacks(per_category: int, seeds: int, eval_config: str = EVAL_CONFIG) -> list[dict]:
    """``trainer.callbacks`` for the toy metrics alone on ``per_category`` prompts of each category with ``seeds``
    images per prompt and every image's verdicts (``eval_config``'s toy evaluation otherwise: its prompts folder
    and sampler, whatever its arguments are called)."""
    import yaml

    [toy] = [c for c in yaml.safe_load(Path(eval_config).read_text())["trainer"]["callbacks"]
             if c["class_path"].endswith(TOY_CALLBACK)]
    init_args = {**toy.get("init_args", {}), "per_category": per_category, "images_per_prompt": seeds,
                 "per_image": True, "log_samples": 0}
    return [{**toy, "init_args": init_args}]


def resolved_config(args: Sequence[str]) -> dict:
    """The config ``t2i-align validate <args>`` would run, as the CLI resolves it (every stacked file and override,
    every class's defaults filled in) without building anything; JSON types only."""
    from t2i_align.cli import T2ICLI

    class ParseOnly(T2ICLI):
        def _set_seed(self) -> None:  # parsing must not reseed this process (nor print "Seed set to")
            pass

        def instantiate_classes(self) -> None:
            pass

    with warnings.catch_warnings():  # args given while the study has its own command line: on purpose
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        config = ParseOnly(args=list(args), run=False).config.as_dict()
    return json.loads(json.dumps(config, default=_json_value))


def _json_value(value: object) -> str:
    """A non-JSON value of a resolved config as a string that is the same in every process: a function or class by
    its import path (``str`` would give its memory address, e.g. CoMat's ``discriminator_optimizer`` default, and so
    another evaluation key, and no reuse, in every study run)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    return re.sub(r" at 0x[0-9a-f]+", "", str(value))


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_id(path: str | Path | None) -> dict | None:
    """A checkpoint's identity: its absolute path and the sha256 of its content (computed once per file version)."""
    if path is None:
        return None
    path = os.path.abspath(path)
    stat = os.stat(path)
    return {"path": path, "sha256": _sha256(path, stat.st_size, stat.st_mtime_ns)}


#: Keys of the resolved ``trainer`` config that say where a run writes or what it shows, not what it computes (nor
#: do :data:`~t2i_align.runs.RUNTIME_KEYS`).
OUTPUT_KEYS = ("default_root_dir", "logger", "enable_progress_bar")


def evaluation_key(args: Sequence[str], ckpt: str | Path | None) -> dict:
    """What an evaluation's numbers depend on: the resolved config of ``t2i-align validate <args>`` (the model,
    the data, ``seed_everything`` and every evaluation callback's ``init_args``: prompts folder, categories,
    prompts per category, images per prompt, seed, sampler settings, whatever they are called) without the
    output locations (:data:`OUTPUT_KEYS`) and runtime keys, and the checkpoint's path and content
    (:func:`checkpoint_id`)."""
    config = resolved_config(args)
    config.pop("config", None)  # the files' paths: their content is in the resolved values
    for dotted in [f"trainer.{key}" for key in OUTPUT_KEYS] + sorted(RUNTIME_KEYS):
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return {"config": config, "checkpoint": checkpoint_id(ckpt)}


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def evaluate(model: Model, callbacks: list[dict] | None = None, label: str = "eval", reevaluate: bool = False,
             root: str | Path = EVALUATIONS, eval_config: str = EVAL_CONFIG) -> dict:
    """Every metric of ``eval_config`` (stacked after the model's configs) for ``model``; ``callbacks`` (a list of
    ``{"class_path", "init_args"}``) replace that config's callbacks.

    The pass runs in ``<root>/<model slug>/<label>_<digest of its evaluation_key>`` and is reused from there
    whenever the same request comes again (``reevaluate``: run it anyway): another checkpoint (path or content),
    prompts, seeds, sampler or any other setting gives another folder. Returns ``{"command", "seconds",
    "metrics", "checkpoint", "root", "per_image"}``, ``per_image`` the ``toy_eval/per_image_step_<N>.jsonl`` of a
    pass with ``per_image: true`` (else None).
    """
    args = [*model.args(), "--config", eval_config, "--trainer.logger=false"]
    if callbacks is not None:
        args.append("--trainer.callbacks=" + json.dumps(callbacks, separators=(",", ":")))
    key = evaluation_key(args, model.checkpoint)
    folder = Path(root) / model.slug / f"{label}_{key_digest(key)[:16]}"
    done = folder / "evaluation.json"
    if done.exists() and not reevaluate:
        cached = json.loads(done.read_text())
        if cached["key"] == key:
            return cached["result"]
    metrics_file = folder / "metrics.json"
    for old in [metrics_file, *folder.glob("toy_eval/per_image_step_*.jsonl")]:  # of an unfinished or forced pass
        old.unlink(missing_ok=True)
    writer = {"class_path": f"{__name__}.MetricsFile", "init_args": {"path": str(metrics_file)}}
    run_args = [*args, f"--trainer.default_root_dir={folder}",
                "--trainer.callbacks+=" + json.dumps(writer, separators=(",", ":"))]
    if model.checkpoint is not None:
        run_args.append(f"--ckpt_path={model.checkpoint}")
    command, seconds = run_cli("validate", run_args)
    records = sorted(folder.glob("toy_eval/per_image_step_*.jsonl"))
    if len(records) > 1:
        raise RuntimeError(f"{folder}: one validation wrote {len(records)} per-image files: {records}")
    result = {"command": command, "seconds": seconds, "metrics": json.loads(metrics_file.read_text()),
              "checkpoint": model.checkpoint, "root": str(folder), "per_image": str(records[0]) if records else None}
    with atomic_path(done) as tmp:
        tmp.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result


def evaluate_toy(model: Model, per_category: int, seeds: int, reevaluate: bool = False,
                 root: str | Path = EVALUATIONS, eval_config: str = EVAL_CONFIG) -> dict:
    """The toy metrics of ``model`` on ``per_category`` evaluation prompts per category x ``seeds`` images, every
    image's verdicts kept (:func:`toy_pass_callbacks`): the pass that paired comparisons read."""
    return evaluate(model, toy_pass_callbacks(per_category, seeds, eval_config), "toy", reevaluate, root, eval_config)
