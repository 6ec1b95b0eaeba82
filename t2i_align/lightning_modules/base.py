"""Shared wiring of every method: the generator, the sampling entry point, optimizers (automatic or manual,
one or several), per-step seeds, the non-finite-loss guard, validation on held-out pairs, sampler progress
and adapter-only checkpoints.

What a method's author needs to know:

* subclass :class:`AlignmentModule` directly and implement ``training_step`` (nothing, for a method that
  trains nothing: it runs through ``validate`` / ``predict`` / the exports without an optimizer);
* make images only through :meth:`AlignmentModule.sample` (override it to change sampling);
* "trainable" has one definition: :meth:`AlignmentModule.trainable_keys` (what checkpoints hold: generator
  and any other trained network) and :meth:`AlignmentModule.generator_trainable` (what EMA and the weight
  export see: the generator's trained weights only);
* frozen experts (rewards, captioners, segmenters) are not children of the module: keep them in a plain
  attribute, ``self.experts = FrozenExperts(...)``, so DDP does not broadcast them and checkpoints do not hold them;
  :meth:`AlignmentModule.on_fit_start` and friends move them to the device (``self.experts``);
* an override of ``on_fit_start`` calls ``super().on_fit_start()``: it keeps the configured optimizer and
  scheduler settings, which ``on_train_start`` puts back over a resumed checkpoint's (the run trains with what
  its config records, ``t2i_align.runs``);
* two networks (CoMat's generator and discriminator): set ``automatic_optimization = False``, return one
  optimizer per network from ``configure_optimizers`` and step each with :meth:`AlignmentModule.manual_step`
  (the non-finite guard included); step the second one with ``count_step=False`` so that ``global_step`` (and
  ``max_steps``, checkpoint and export intervals) count generator updates, one per batch. A second network
  updated by its own backward is kept out of DDP (:func:`ddp_ignore`, ``manual_step(..., sync=...)``).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torchmetrics import MeanMetric

from t2i_align.common import ConfigError, derive_seed
from t2i_align.diffusion.generator import Generator, GeneratorConfig, SampleOutput
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.io import check_trainable_state


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)


def batch_pairs(batch: dict, method: str) -> dict:
    """The image-caption pairs of a training batch (``batch["pairs"]``, see :class:`~t2i_align.datamodules.T2IDataModule`);
    an error naming the config key when the data has none."""
    if "pairs" not in batch:
        raise ConfigError(f"{method} trains on image-caption pairs: set data.init_args.train_pairs")
    return batch["pairs"]


def batch_prompts(batch: dict, method: str) -> list[str]:
    """The prompt texts of a training batch (``batch["prompts"]["prompts"]``); an error naming the config key when
    the data has none."""
    if "prompts" not in batch:
        raise ConfigError(f"{method} trains on prompts: set data.init_args.train_prompts")
    return list(batch["prompts"]["prompts"])


class FrozenExperts:
    """Frozen networks a method consults (reward models, captioners, segmenters) kept *outside* the module
    tree: DDP does not broadcast them, checkpoints do not hold them, ``module.train()`` does not switch their
    dropout on. :class:`AlignmentModule` moves them to its device when fit, validation, test or predict start."""

    def __init__(self, **experts) -> None:
        self._experts = {name: expert.requires_grad_(False).eval() if isinstance(expert, torch.nn.Module) else expert
                         for name, expert in experts.items()}

    def __getitem__(self, name: str):
        return self._experts[name]

    def items(self):
        return self._experts.items()

    def to(self, device: torch.device) -> FrozenExperts:
        """Move every expert to ``device``: ``nn.Module``s and any expert with its own ``to(device)`` (one that
        loads its models lazily, or holds several): experts follow the module, on every rank."""
        for expert in self._experts.values():
            if callable(getattr(expert, "to", None)):
                expert.to(device)
        return self


class AlignmentModule(L.LightningModule):
    """Base class of the methods (see the module docstring for the contract). Subclasses implement
    ``training_step``; validation reports the noise-prediction loss on held-out pairs.

    Args:
        generator: which pipeline to load and what to train (LoRA or full UNet).
        optimizer: optimizer over the trainable parameters, e.g. ``torch.optim.AdamW`` with ``lr``.
        lr_scheduler: optional scheduler, stepped every optimizer step.
        seed: base of every per-step random stream (noise, timesteps, sampling).
        max_consecutive_nonfinite: stop the run after this many consecutive steps with a NaN/inf loss.
        caption_dropout: probability that a training pair is learned with the empty caption in the denoising loss
            (Finetune, TokenCompose, ARL, ReFL's L_pre): keeps the unconditional branch that CFG samples with. SD was
            pretrained with 10 %, as was the ToyWorld base.
    """

    def __init__(
        self,
        generator: GeneratorConfig,
        optimizer: OptimizerCallable = _adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        max_consecutive_nonfinite: int = 5,
        caption_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.caption_dropout = caption_dropout
        self.generator = Generator(generator)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.seed = seed
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.batches_started = 0  # training batches begun, skipped ones included; keys the random streams
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.val_loss = MeanMetric()
        self.experts = FrozenExperts()  # a method sets its own: self.experts = FrozenExperts(reward=...)
        self._trainable_keys: frozenset[str] | None = None  # fixed once: trainable_keys()
        # Checkpoints hold trainable state only; the frozen base is reloaded from `generator.pretrained`.
        self.strict_loading = False

    # ---------------------------------------------------------------------------------- experts
    def _move_experts(self) -> None:
        self.experts.to(self.device)

    def on_fit_start(self) -> None:
        self._move_experts()
        # As configured: Lightning restores a checkpoint's optimizer and scheduler states over them after this hook.
        self._configured_optimization = optimization_settings(self.trainer)

    def on_train_start(self) -> None:
        configured = getattr(self, "_configured_optimization", None)
        if self.trainer.ckpt_path is not None and configured is not None:
            changed = apply_optimization_settings(self.trainer, configured)
            if changed:
                rank_zero_info(f"Resumed with this run's optimizer settings instead of the checkpoint's: {', '.join(changed)}")

    def on_validation_start(self) -> None:
        self._move_experts()

    def on_test_start(self) -> None:
        self._move_experts()

    def on_predict_start(self) -> None:
        self._move_experts()

    # ---------------------------------------------------------------------------------- sampling
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], sampling: SamplingSettings | None = None,
               **kwargs) -> SampleOutput:
        """The one way this method makes images: evaluation callbacks, benchmark exports (``predict``), ARL's
        candidates and the ToyWorld evaluation all call it with their own ``sampling`` settings; ``kwargs`` are
        :meth:`Generator.sample`'s other arguments. A method that changes how images are made (an inference-time
        method) overrides this, and every metric and export sees it."""
        return self.generator.sample(prompts, seeds, sampling, **kwargs)

    def predict_step(self, batch, batch_idx: int) -> list[torch.Tensor]:
        """Images of a batch of export jobs (:class:`~t2i_align.datamodules.export.BenchmarkExportData`):
        one ``n x 3 x H x W`` tensor in [0, 1] per job (``n`` > 1 for grids)."""
        prompts = [p for p, seeds in zip(batch["prompts"], batch["seeds"]) for _ in seeds]
        seeds = [s for seeds in batch["seeds"] for s in seeds]
        images = self.sample(prompts, seeds, SamplingSettings(**batch["sampling"])).images.float().cpu()
        return list(images.split([len(s) for s in batch["seeds"]]))

    # ------------------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Noise-prediction loss of held-out pairs at per-sample fixed noise and timesteps (comparable across
        runs, batch sizes and world sizes); prompt-only sets are for the evaluation callbacks."""
        if "pixel_values" not in batch:
            return
        # Every rank gets pair batches (the validation split pads a short rank with repeats), so every rank or
        # none joins the sync in on_validation_epoch_end; a repeat (batch["padding"]) is not counted.
        self._val_pairs_seen = True
        padding = batch.get("padding")
        repeats = [False] * len(batch["ids"]) if padding is None else padding.tolist()
        for pixels, caption, sample_id, repeat in zip(batch["pixel_values"], batch["captions"], batch["ids"], repeats,
                                                      strict=True):
            if repeat:
                continue
            rng = torch.Generator("cpu").manual_seed(derive_seed(self.seed, "val", sample_id))
            self.val_loss.update(self.generator.denoising_loss(pixels[None], [caption], rng))

    def on_validation_epoch_end(self) -> None:
        # compute() all-gathers: every rank takes part when validation had pairs (each rank then saw pair batches,
        # also one whose pairs were all repeats and counted nothing), none when it had prompts only.
        seen, self._val_pairs_seen = getattr(self, "_val_pairs_seen", False), False
        if not seen and self.val_loss.update_count == 0:
            return  # nothing to report (prompt-only validation)
        value = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/denoise_loss", value, sync_dist=False)

    # ------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for name, p in self.named_parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters: it runs through validate, "
                               "test and predict, not fit")
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def step_rng(self, stream: str = "train") -> torch.Generator:
        """Random generator for this batch: a function of (seed, stream, batch count, rank) only, so a
        resumed run draws exactly what the uninterrupted run would have drawn."""
        return torch.Generator("cpu").manual_seed(derive_seed(self.seed, stream, self.batches_started, self.global_rank))

    def guard_nonfinite(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Return ``loss``, or None when it is NaN/inf on any rank: Lightning then skips backward, so the
        optimizer step finds no gradients and changes nothing (the batch still counts towards
        ``max_steps``). All ranks take the same decision, so DDP never waits on a rank that skipped."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            self.nonfinite_run = 0
            return loss
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_total))
        if self.nonfinite_run >= self.max_consecutive_nonfinite:
            raise RuntimeError(
                f"the training loss was NaN/inf on {self.nonfinite_run} consecutive steps (limit "
                f"max_consecutive_nonfinite={self.max_consecutive_nonfinite}; {self.nonfinite_total} in this run). "
                "Lower the learning rate, use bf16 instead of fp16, or check the data."
            )
        return None

    def finish_step(self, loss: torch.Tensor, logs: dict[str, torch.Tensor] | None = None,
                    batch_size: int = 1) -> torch.Tensor | None:
        """The end of an automatic-optimisation ``training_step``: the non-finite guard, then ``train/loss`` (on the
        progress bar) and ``logs``. Returns what ``training_step`` returns (None skips the update)."""
        loss = self.guard_nonfinite(loss)
        if loss is not None:
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            if logs:
                self.log_dict(logs, batch_size=batch_size)
        return loss

    def manual_step(self, loss: torch.Tensor, optimizer, clip_norm: float | None = None,
                    sync: Sequence[torch.nn.Parameter] = (), count_step: bool = True) -> torch.Tensor | None:
        """One manual-optimisation update of ``optimizer`` (a ``LightningOptimizer`` from ``self.optimizers()``):
        the non-finite guard, ``manual_backward``, optional gradient-norm clipping, step, zero_grad. A skipped
        (NaN/inf) loss still calls ``step`` with no gradients, so it changes nothing but counts towards
        ``global_step``/``max_steps`` as in automatic optimisation. Returns the loss or None when skipped.

        ``sync``: the only parameters ``loss`` reaches, kept out of DDP (a second network, see :func:`ddp_ignore`):
        the backward runs under DDP's ``no_sync`` (it has nothing for DDP to reduce, and DDP would otherwise wait
        for its own parameters) and their gradients are averaged over the ranks here, before clipping, in one
        ``all_reduce`` (:func:`average_gradients`).

        ``count_step=False`` steps a secondary optimizer (a discriminator's) through the strategy and the
        precision plugin as usual but without advancing ``global_step``: steps then count the generator's
        updates, one per batch.

        ``precision: 16-mixed`` (a loss scaler): the gradients here are the scaled ones (Lightning's plugin unscales
        them inside the step), so the clipping threshold is scaled with them, ``clip_norm * scale``: the same clip as
        ``clip_norm`` on the unscaled gradients. A skipped loss then advances the step counters without calling the
        plugin (``GradScaler.step`` asserts on an optimizer without gradients)."""
        scaler = loss_scaler(self.trainer)
        loss = self.guard_nonfinite(loss)
        if loss is not None:
            model = self.trainer.strategy.model
            outside_ddp = sync and isinstance(model, torch.nn.parallel.DistributedDataParallel)
            with model.no_sync() if outside_ddp else contextlib.nullcontext():
                self.manual_backward(loss)
            if outside_ddp:
                average_gradients([param.grad for param in sync if param.grad is not None])
            if clip_norm is not None:
                # Clipping the scaled gradients g*s at clip_norm*s clips g at clip_norm (the norm is homogeneous);
                # unscaling here instead (scaler.unscale_) would make the plugin's own unscale_ in the step raise.
                # The scale is the one of this backward: it changes only in scaler.update(), after a step.
                scale = float(scaler.get_scale()) if scaler is not None else 1.0
                self.clip_gradients(optimizer, gradient_clip_val=clip_norm * scale, gradient_clip_algorithm="norm")
        if loss is None and scaler is not None:
            if count_step:  # what LightningOptimizer.step does around the step: the counters behind global_step
                optimizer._on_before_step()
                optimizer._on_after_step()
        elif count_step:
            optimizer.step()
        else:  # LightningOptimizer.step is this plus the progress counters behind global_step
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)
        optimizer.zero_grad(set_to_none=True)
        return loss

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Counted at the start: ModelCheckpoint saves in on_train_batch_end, which Lightning runs for
        # callbacks *before* the module's own hook, and the saved state must include this batch.
        self.batches_started += 1
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "advance"):
            datamodule.advance()  # the sampler position counts the samples trained on

    # ------------------------------------------------------------------------------ checkpoints
    def setup(self, stage: str) -> None:
        """Fixes :meth:`trainable_keys` before anything toggles ``requires_grad`` (an override calls
        ``super().setup(stage)``)."""
        self.trainable_keys()

    def trainable_keys(self) -> set[str]:
        """Names of every trained parameter (generator and any other trained network): what checkpoints hold.

        Fixed once, at the first call (``setup``, before the first step): the live ``requires_grad`` flags are not a
        definition during a step. Manual optimisation switches them off for the other optimizers' parameters
        (``toggled_optimizer``) and peft's ``disable_adapters`` for the LoRA weights, and a checkpoint can be written
        inside such a window (Lightning's SLURM ``SIGUSR1`` handler saves at once): it then lacked a network and
        could not be resumed. Parameters held by the trainer's optimizers count as trained too, in case the first
        call falls inside such a window (an override of ``setup`` that does not call ``super().setup``)."""
        if self._trainable_keys is None:
            held: set[int] = set()
            trainer = self._trainer
            for optimizer in (trainer.optimizers if trainer is not None else []):
                held.update(id(p) for group in optimizer.param_groups for p in group["params"])
            self._trainable_keys = frozenset(name for name, p in self.named_parameters()
                                             if p.requires_grad or id(p) in held)
        return set(self._trainable_keys)

    def generator_trainable(self) -> dict[str, torch.nn.Parameter]:
        """The generator's trained parameters by name (LoRA or the UNet): what ``TrainableEMA`` averages and
        ``ExportWeights`` writes, also when a method trains other networks (a discriminator). The generator's
        share of :meth:`trainable_keys` (fixed, whatever the live flags say)."""
        keys = self.trainable_keys()
        return {f"generator.{name}": p for name, p in self.generator.named_parameters() if f"generator.{name}" in keys}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keys = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint["t2i_align"] = {
            "batches_started": self.batches_started,
            "nonfinite_total": self.nonfinite_total,
            "seed": self.seed,
            "pretrained": self.generator.config.pretrained,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_trainable_state(checkpoint.get("state_dict", {}), self, getattr(self._trainer, "ckpt_path", None))
        state = checkpoint.get("t2i_align", {})
        self.batches_started = int(state.get("batches_started", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))


def optimization_settings(trainer: L.Trainer) -> tuple[list[list[dict]], list[dict]]:
    """Every optimizer's param-group settings (all but the parameters: lr, weight decay, betas, ...) and every
    learning-rate scheduler's state, as copies."""
    groups = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in trainer.optimizers]
    return copy.deepcopy((groups, [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]))


def apply_optimization_settings(trainer: L.Trainer, configured: tuple[list[list[dict]], list[dict]]) -> list[str]:
    """After Lightning restored a checkpoint's optimizer and scheduler states: put back the configured settings
    (:func:`optimization_settings` before the restore) and replay each configured schedule to the restored step,
    so the run trains with what its config records. The optimizers' own state (moments, step counts) stays.
    A resume with the checkpoint's own settings changes nothing. Returns the changes ("lr 0.0001 -> 0.5")."""
    groups, schedulers = configured
    before = optimization_settings(trainer)[0]
    for optimizer, settings in zip(trainer.optimizers, groups):
        for group, configured_group in zip(optimizer.param_groups, settings):
            group.update(copy.deepcopy(configured_group))
    for config, state in zip(trainer.lr_scheduler_configs, schedulers):
        scheduler, restored_steps = config.scheduler, config.scheduler.last_epoch
        scheduler.load_state_dict(copy.deepcopy(state))  # its configured settings, at its start
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": a replay, not training
            warnings.simplefilter("ignore")
            for _ in range(restored_steps - state["last_epoch"]):
                scheduler.step()
    changes = []
    for old_groups, new_groups in zip(before, optimization_settings(trainer)[0]):
        old, new = old_groups[0], new_groups[0]  # shown for the first param group of each optimizer
        changes += [f"{key} {old.get(key)!r} -> {new[key]!r}" for key in new if repr(old.get(key)) != repr(new[key])]
    return changes


def ddp_ignore(module: L.LightningModule, prefix: str) -> None:
    """Keep the parameters and buffers under ``prefix`` (e.g. ``"discriminator."``) out of DDP: not broadcast at
    start, not reduced in backward. For a second network updated by its own backward in the same training step
    (DDP allows one backward per forward): reduce its gradients with ``manual_step(..., sync=...)`` and make
    its starting weights equal on every rank (:func:`broadcast_parameters`). Call before DDP wraps the module
    (``setup``). PyTorch's documented workaround (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``,
    pytorch/pytorch#43690)."""
    names = [n for n, _ in module.named_parameters() if n.startswith(prefix)]
    names += [n for n, _ in module.named_buffers() if n.startswith(prefix)]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


def loss_scaler(trainer: L.Trainer):
    """The precision plugin's enabled loss scaler (``precision: 16-mixed``: a ``GradScaler``), or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or (callable(getattr(scaler, "is_enabled", None)) and not scaler.is_enabled()):
        return None
    return scaler


def average_gradients(grads: Sequence[torch.Tensor]) -> None:
    """Average ``grads`` over the ranks in place, one ``all_reduce`` per (device, dtype) (one in practice): the
    tensors are flattened into one bucket, reduced and copied back, instead of one call per tensor (a
    discriminator's ~258 LoRA tensors, each a collective's latency at 128 ranks). The same bucketing as DDP's
    reducer and ``torch.distributed``'s ``_flatten_dense_tensors`` helpers (torch/_utils.py). Every rank passes
    the same tensors in the same order (the same network's gradients)."""
    if not grads:
        return
    world = torch.distributed.get_world_size()
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    for group in groups.values():
        bucket = _flatten_dense_tensors(group)
        torch.distributed.all_reduce(bucket)
        bucket /= world
        for grad, averaged in zip(group, _unflatten_dense_tensors(bucket, group)):
            grad.copy_(averaged)


def broadcast_parameters(params: Sequence[torch.nn.Parameter], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank (a no-op outside distributed runs)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for param in params:
            torch.distributed.broadcast(param.data, src)


