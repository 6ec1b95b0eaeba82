"""Generation for evaluation, shared by the metric callbacks (FID, CLIP score, TIFA, ToyWorld).

A fixed list of items (prompt, per-item seed) is generated with the current weights (LoRA applied),
under ``no_grad`` and with every submodule in eval mode, at the end of each validation (and test).
Rank ``r`` of ``W`` takes items ``r, r+W, ...`` (:class:`~t2i_align.datamodules.sampler.ShardSampler`'s split):
every rank makes as many images, at least one, and a rank short of items repeats one; the repeats are
dropped before :meth:`update` and the sample logs, so each item is scored once, as in one process.
Subclasses implement :meth:`reset`, :meth:`update` and
:meth:`compute`; ``compute`` runs on every rank (metric syncs are collective) and returns identical
values everywhere, logged as ``<val|test>/<key>``. The sampler settings are logged once as
hyperparameters (``eval/<name>``) so every number can be traced to how its images were made.

Sample logging: the first ``log_samples`` items (in item order, gathered from all ranks to rank 0) go
to ``<default_root_dir>/samples/<name>/step_<N>.png`` as a grid and, with a W&B logger, to a table of
(prompt, seed, image, per-sample scores).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Sequence

import lightning as L
import torch
import torch.distributed as dist

from t2i_align.common import EvalItem, derive_seed, image_grid  # noqa: F401  (re-exported)
from t2i_align.datamodules.prompts import Prompt, PromptSource, load_prompt_sources
from t2i_align.datamodules.sampler import PaddingIndex, ShardSampler
from t2i_align.diffusion.sampling import SamplingSettings


def make_items(prompts: Sequence[Prompt], images_per_prompt: int = 1, seed: int = 0) -> list[EvalItem]:
    """Items for ``prompts`` with seeds that depend only on (seed, source, id, k): every run and every
    method sees the same noise for the same prompt."""
    return [
        EvalItem(f"{p.source}/{p.id}/{k}", p.text, derive_seed(seed, p.source, p.id, k) % (2**31), p.source)
        for p in prompts
        for k in range(images_per_prompt)
    ]


@contextmanager
def eval_mode(module: torch.nn.Module):
    """Every submodule in eval mode (e.g. no LoRA dropout), each restored to its own mode afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


class GenerativeEvaluation(L.Callback):
    """Base class of the evaluation callbacks; its arguments are shared by all of them.

    Args:
        prompts: prompt sets to generate (concatenated in order; ``weight`` is ignored).
        images_per_prompt: images per prompt, each with its own fixed seed.
        sampling: sampler settings (25 DDIM steps, CFG 7.5 by default).
        batch_size: generation batch per rank.
        seed: base of the per-item seeds.
        log_samples: how many images (first items) to log per evaluation (0: none).
    """

    name = "eval"
    #: attributes that hold frozen models (detector, VQA model, judge, ...): :meth:`run` moves them to the module's
    #: device on every rank before they see an image (:meth:`frozen_experts`)
    expert_attributes: tuple[str, ...] = ()

    def __init__(self, prompts: list[PromptSource] | None = None, images_per_prompt: int = 1,
                 sampling: SamplingSettings = SamplingSettings(num_inference_steps=25), batch_size: int = 8,
                 seed: int = 0, log_samples: int = 16) -> None:
        if images_per_prompt < 1 or batch_size < 1:
            raise ValueError(f"images_per_prompt and batch_size must be >= 1, got {images_per_prompt}, {batch_size}")
        self.prompt_sources = [p if isinstance(p, PromptSource) else PromptSource(**p) for p in (prompts or [])]
        self.images_per_prompt, self.seed = images_per_prompt, seed
        self.sampling = sampling
        self.batch_size, self.log_samples = batch_size, log_samples
        self._items: list[EvalItem] | None = None
        self._settings_logged = False

    # ----------------------------------------------------------------------------------- subclass API
    def load_items(self) -> list[EvalItem]:
        prompts, _ = load_prompt_sources(self.prompt_sources)
        return make_items(prompts, self.images_per_prompt, self.seed)

    def reset(self, pl_module: L.LightningModule) -> None:
        """Clear the per-pass state before generating."""

    def update(self, images: torch.Tensor, items: Sequence[EvalItem], pl_module: L.LightningModule) -> list[dict] | None:
        """Consume a batch (float ``B x 3 x H x W`` in [0, 1]); may return per-image scores for sample logs."""
        raise NotImplementedError

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Metrics after all ranks updated; called on every rank, must return the same values everywhere."""
        raise NotImplementedError

    def frozen_experts(self) -> list[Any]:
        """The frozen models this evaluation scores with (default: those named by :attr:`expert_attributes`)."""
        return [e for e in (getattr(self, name, None) for name in self.expert_attributes) if e is not None]

    # -------------------------------------------------------------------------------------- machinery
    def move_experts(self, device: torch.device) -> None:
        """Experts follow the module, on every rank (rank r's images are on ``cuda:r``): each with a ``to``
        (``nn.Module``s and the expert classes) is moved to ``device``; other objects are left as they are."""
        for expert in self.frozen_experts():
            if callable(getattr(expert, "to", None)):
                expert.to(device)

    @property
    def items(self) -> list[EvalItem]:
        if self._items is None:
            self._items = self.load_items()
            keys = [it.key for it in self._items]
            if len(set(keys)) != len(keys):
                raise ValueError(f"{type(self).__name__}: duplicate item keys in the evaluation set")
        return self._items

    def settings(self) -> dict[str, Any]:
        return {"items": len(self.items), "images_per_prompt": self.images_per_prompt, "seed": self.seed, **self.sampling.as_dict()}

    def shard(self, trainer: L.Trainer) -> list[tuple[int, bool]]:
        """This rank's items: (position in :attr:`items`, is a repeat), as many on every rank, at least one."""
        return [(int(i), isinstance(i, PaddingIndex))
                for i in ShardSampler(len(self.items), trainer.world_size, trainer.global_rank)]

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Generate this rank's share, update, compute on all ranks; log samples. Returns the metrics.

        A repeated item (a rank short of items) is generated like the others, so that the ranks make the same
        batches, but never reaches :meth:`update` or the sample logs: subclasses see each item once."""
        mine = self.shard(trainer)
        self.move_experts(pl_module.device)
        self.reset(pl_module)
        kept: list[tuple[int, EvalItem, torch.Tensor, dict]] = []
        with torch.no_grad(), eval_mode(pl_module):
            for start in range(0, len(mine), self.batch_size):
                chunk = mine[start:start + self.batch_size]
                batch = [self.items[index] for index, _ in chunk]
                images = pl_module.sample([it.prompt for it in batch], [it.seed for it in batch],
                                          self.sampling).images.float().clamp(0, 1)
                real = [j for j, (_, repeat) in enumerate(chunk) if not repeat]
                if not real:
                    continue
                if len(real) < len(chunk):
                    images, batch = images[real], [batch[j] for j in real]
                scores = self.update(images, batch, pl_module) or [{} for _ in batch]
                for j, image, item, s in zip(real, images, batch, scores):
                    index = chunk[j][0]  # position in self.items
                    if index < self.log_samples:
                        kept.append((index, item, image.cpu(), s))
        metrics = self.compute(trainer, pl_module)
        if self.log_samples:
            self._log_samples(trainer, kept)
        return metrics

    def _run_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> dict[str, float]:
        if not self._settings_logged:
            for logger in trainer.loggers:
                logger.log_hyperparams({f"eval/{self.name}": self.settings()})
            self._settings_logged = True
        start = time.perf_counter()
        metrics = self.run(trainer, pl_module)
        # identical on all ranks after compute(): no further sync. The pass's wall time (rank 0's, which
        # waited for every rank in compute()) is logged beside the metrics as the cost of an evaluation.
        pl_module.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, sync_dist=False)
        pl_module.log(f"{prefix}/{self.name}/seconds", time.perf_counter() - start, sync_dist=False)
        return metrics

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._run_and_log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_and_log(trainer, pl_module, "test")

    def _log_samples(self, trainer: L.Trainer, kept: list) -> None:
        # every rank takes part in the gather, also one with nothing to show
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            parts: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(parts, kept)
            kept = [k for part in parts for k in part]
        if not trainer.is_global_zero or not kept:
            return
        kept.sort(key=lambda k: k[0])
        folder = os.path.join(trainer.default_root_dir, "samples", self.name)
        os.makedirs(folder, exist_ok=True)
        image_grid([k[2] for k in kept]).save(os.path.join(folder, f"step_{trainer.global_step}.png"))
        for logger in trainer.loggers:
            if hasattr(logger, "log_table") and hasattr(logger, "experiment"):  # W&B
                import wandb

                score_keys = sorted({key for k in kept for key in k[3]})
                rows = [[it.prompt, it.seed, wandb.Image(img.permute(1, 2, 0).numpy()), *[s.get(key) for key in score_keys]]
                        for _, it, img, s in kept]
                logger.log_table(f"samples/{self.name}", columns=["prompt", "seed", "image", *score_keys], data=rows,
                                 step=trainer.global_step)
