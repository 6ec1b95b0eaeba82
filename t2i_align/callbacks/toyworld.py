"""ToyWorld evaluation during training: judge-scored alignment metrics per prompt category."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from t2i_align.io import atomic_path

from t2i_align.toyworld.evaluation import image_grid, load_items, metric_keys, score_items, summarise
from t2i_align.toyworld.judge import ToyJudge
from t2i_align.toyworld.splits import EVAL_CATEGORIES


class ToyWorldEvaluation(L.Callback):
    """At the end of every validation, generate the ToyWorld evaluation prompts with the current weights,
    judge them and log ``val/toy/<category>/<metric>`` and ``val/toy/<metric>`` (mean over categories).

    Items are split across ranks without duplicates (rank r takes items r, r+W, ...); the per-metric
    sums and counts are all-reduced, so every rank logs the same numbers. A sample grid of rank 0's first
    images goes to W&B (when logging there) and to ``<default_root_dir>/toy_samples/step_<N>.png``.

    Args:
        prompts_dir: folder with ``<category>.txt`` files (``<build>/prompts/eval`` of ``toyworld.build``).
        categories: categories to evaluate (default all seven).
        per_category: first N prompts of each category (None: all).
        images_per_prompt: images per prompt, each with its own fixed seed.
        num_inference_steps, guidance_scale, scheduler: sampler settings (logged with the metrics' config).
        batch_size: generation batch per rank.
        seed: base of the per-item seeds.
        grid_images: how many images the sample grid shows (0: none).
        evaluate_before_fit: also evaluate the starting weights when training starts (logged at step 0);
            when fit ends, rank 0 prints the metrics before and after side by side and writes them to
            ``<default_root_dir>/toy_eval.json``.
    """

    def __init__(self, prompts_dir: str, categories: list[str] | None = None, per_category: int | None = 16,
                 images_per_prompt: int = 1, num_inference_steps: int = 25, guidance_scale: float = 5.0,
                 scheduler: str = "ddim", batch_size: int = 16, seed: int = 0, grid_images: int = 16,
                 evaluate_before_fit: bool = False) -> None:
        self.categories = list(categories or EVAL_CATEGORIES)
        self.items = load_items(prompts_dir, self.categories, per_category, images_per_prompt, seed)
        self.keys = metric_keys(self.categories)
        self.sample_kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler)
        self.batch_size = batch_size
        self.grid_images = grid_images
        self.judge = ToyJudge()  # not a module: nothing of it is broadcast by DDP or saved in checkpoints
        self.evaluate_before_fit = evaluate_before_fit
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Generate, judge and all-reduce: the metrics, identical on every rank."""
        mine = self.items[trainer.global_rank::trainer.world_size]
        keep = self.grid_images if trainer.is_global_zero else 0
        sums, counts, kept = score_items(pl_module.generator, mine, self.judge, self.keys, self.batch_size,
                                         keep_images=keep, **self.sample_kwargs)
        # every rank reduces the same two vectors, also a rank that had no items
        device = pl_module.device
        sums = trainer.strategy.reduce(sums.to(device), reduce_op="sum").cpu()
        counts = trainer.strategy.reduce(counts.to(device), reduce_op="sum").cpu()
        if kept:
            self._log_grid(trainer, kept)
        return summarise(self.keys, sums, counts)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.after = self.evaluate(trainer, pl_module)
        # values are identical on all ranks after the reduce: no further sync needed
        pl_module.log_dict({f"val/toy/{k}": v for k, v in self.after.items()}, sync_dist=False)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.evaluate_before_fit or self.before is not None:
            return
        with _eval_mode(pl_module):  # e.g. no LoRA dropout while sampling
            self.before = self.evaluate(trainer, pl_module)
        for logger in trainer.loggers:  # loggers write on rank 0 only
            logger.log_metrics({f"val/toy/{k}": v for k, v in self.before.items()}, step=trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before is None or self.after is None or not trainer.is_global_zero:
            return
        rank_zero_info(comparison_table(self.before, self.after, len(self.items), self.sample_kwargs))
        report = {"before": self.before, "after": self.after, "step": trainer.global_step, "images": len(self.items),
                  "sampling": self.sample_kwargs}
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        with atomic_path(os.path.join(trainer.default_root_dir, "toy_eval.json")) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")

    def _log_grid(self, trainer: L.Trainer, kept: list) -> None:
        grid = image_grid([img for img, _, _ in kept])
        folder = os.path.join(trainer.default_root_dir, "toy_samples")
        os.makedirs(folder, exist_ok=True)
        grid.save(os.path.join(folder, f"step_{trainer.global_step}.png"))
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                captions = [f"{it.prompt} | clauses={s['all_clauses']:.0f}" for _, it, s in kept]
                logger.log_image("val/toy/samples", [img for img, _, _ in kept], caption=captions, step=trainer.global_step)


@contextmanager
def _eval_mode(module: torch.nn.Module):
    """Every submodule in eval mode, each restored to its own mode afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def comparison_table(before: dict[str, float], after: dict[str, float], images: int, sampling: dict) -> str:
    """The toy metrics before and after training, side by side (means over categories first)."""
    settings = ", ".join(f"{k}={v}" for k, v in sampling.items())
    lines = [f"ToyWorld evaluation: {images} images ({settings})",
             f"{'metric':34s} {'before':>7s} {'after':>7s} {'change':>7s}"]
    keys = [k for k in before if "/" not in k] + [k for k in before if "/" in k]
    for key in keys:
        if key in after:
            lines.append(f"{key:34s} {before[key]:7.3f} {after[key]:7.3f} {after[key] - before[key]:+7.3f}")
    return "\n".join(lines)
