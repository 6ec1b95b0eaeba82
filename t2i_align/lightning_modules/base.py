"""Shared wiring of every method: the generator, optimizers, per-step seeds, non-finite-loss guard,
sampler progress and adapter-only checkpoints."""

from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from t2i_align.common import derive_seed
from t2i_align.diffusion.generator import Generator, GeneratorConfig, SampleOutput


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)


class AlignmentModule(L.LightningModule):
    """Base class of the methods. Subclasses implement ``training_step`` (and usually ``validation_step``).

    Args:
        generator: which pipeline to load and what to train (LoRA or full UNet).
        optimizer: optimizer over the trainable parameters, e.g. ``torch.optim.AdamW`` with ``lr``.
        lr_scheduler: optional scheduler, stepped every optimizer step.
        seed: base of every per-step random stream (noise, timesteps, sampling).
        max_consecutive_nonfinite: stop the run after this many consecutive steps with a NaN/inf loss.
    """

    def __init__(
        self,
        generator: GeneratorConfig,
        optimizer: OptimizerCallable = _adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        max_consecutive_nonfinite: int = 5,
    ) -> None:
        super().__init__()
        self.generator = Generator(generator)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.seed = seed
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.batches_started = 0  # training batches begun, skipped ones included; keys the random streams
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        # Checkpoints hold trainable state only; the frozen base is reloaded from `generator.pretrained`.
        self.strict_loading = False

    # ---------------------------------------------------------------------------------- sampling
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], **sampling) -> SampleOutput:
        """The one way this method makes images: evaluation callbacks, benchmark exports (``predict``), ARL's
        candidates and the ToyWorld evaluation all call it. ``sampling``: :meth:`Generator.sample`'s
        arguments (``num_inference_steps``, ``guidance_scale``, ``scheduler``, ...). A method that changes how
        images are made (an inference-time method) overrides this, and every metric and export sees it."""
        return self.generator.sample(prompts, seeds, **sampling)

    def predict_step(self, batch, batch_idx: int) -> list[torch.Tensor]:
        """Images of a batch of export jobs (:class:`~t2i_align.datamodules.export.BenchmarkExportData`):
        one ``n x 3 x H x W`` tensor in [0, 1] per job (``n`` > 1 for grids)."""
        prompts = [p for p, seeds in zip(batch["prompts"], batch["seeds"]) for _ in seeds]
        seeds = [s for seeds in batch["seeds"] for s in seeds]
        images = self.sample(prompts, seeds, **batch["sampling"]).images.float().cpu()
        return list(images.split([len(s) for s in batch["seeds"]]))

    # ------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.generator.trainable_parameters())
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

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Counted at the start: ModelCheckpoint saves in on_train_batch_end, which Lightning runs for
        # callbacks *before* the module's own hook, and the saved state must include this batch.
        self.batches_started += 1
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "advance"):
            datamodule.advance()  # the sampler position counts the samples trained on

    # ------------------------------------------------------------------------------ checkpoints
    def trainable_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

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


def _lora_ranks(shapes: dict[str, torch.Size]) -> list[int]:
    return sorted({shape[0] for key, shape in shapes.items() if "lora_A" in key})


def check_trainable_state(state: dict[str, torch.Tensor], module: AlignmentModule, path: str | None = None) -> None:
    """Raise one sentence naming the checkpoint when its trainable state does not fit ``module`` (other LoRA
    rank or target modules, LoRA vs full fine-tuning) instead of PyTorch's line per mismatched tensor."""
    where = f"checkpoint {path}" if path else "the checkpoint"
    keys = module.trainable_keys()
    params = {k: p for k, p in module.named_parameters() if k in keys}
    expected, found = set(params), set(state)
    if expected != found:
        lora_here, lora_there = any("lora_" in k for k in expected), any("lora_" in k for k in found)
        if lora_here != lora_there:
            trained = "LoRA" if lora_there else "full UNet fine-tuning"
            here = "LoRA" if lora_here else "full UNet fine-tuning"
            raise RuntimeError(f"{where} was trained with {trained}; this model is set up for {here} "
                               "(model.init_args.generator.lora)")
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise RuntimeError(
            f"{where} does not fit this model: {len(missing)} trainable tensors missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); was it trained with other LoRA target_modules "
            "or another method?"
        )
    differing = [k for k in sorted(expected) if tuple(state[k].shape) != tuple(params[k].shape)]
    if differing:
        ranks_there = _lora_ranks({k: state[k].shape for k in differing})
        ranks_here = _lora_ranks({k: params[k].shape for k in differing})
        if ranks_there and ranks_here:
            show = lambda r: str(r[0]) if len(r) == 1 else str(r)  # noqa: E731
            raise RuntimeError(f"{where} was trained with LoRA rank {show(ranks_there)}; this model has rank "
                               f"{show(ranks_here)} (model.init_args.generator.lora.rank)")
        k = differing[0]
        raise RuntimeError(f"{where} does not fit this model: {len(differing)} tensors differ in shape, e.g. {k} is "
                           f"{tuple(state[k].shape)} there and {tuple(params[k].shape)} here")
