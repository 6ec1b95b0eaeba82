"""ToyWorld evaluation during training: judge-scored alignment metrics per prompt category."""

from __future__ import annotations

import json
import os
from typing import Sequence

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info

from t2i_align.callbacks.evaluation import EvalItem, GenerativeEvaluation
from t2i_align.io import atomic_path
from t2i_align.toyworld.evaluation.scoring import accumulate, judge_records, load_items, metric_keys, summarise
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.splits import EVAL_CATEGORIES


class ToyWorldEvaluation(GenerativeEvaluation):
    """At the end of every validation (and test), generate the ToyWorld evaluation prompts with the current
    weights, judge them and log ``val/toy/<category>/<metric>`` and ``val/toy/<metric>`` (mean over
    categories). Items are split across ranks (see :class:`GenerativeEvaluation`); the per-metric sums and
    counts are all-reduced, so every rank logs the same numbers.

    Args:
        prompts_dir: folder with ``<category>.txt`` files (``<build>/prompts/eval`` of ``commands.toyworld_build``).
        categories: categories to evaluate (default all seven).
        per_category: first N prompts of each category (None: all).
        evaluate_before_fit: also evaluate the starting weights when training starts (logged at step 0);
            when fit ends, rank 0 prints the metrics before and after side by side and writes them to
            ``<default_root_dir>/toy_eval.json``.
        per_image: also write every image's result (item key, category, prompt, seed, metrics and each
            clause's verdict: ``toyworld.evaluation.metrics.clause_verdicts``), one JSON line per image in item order, to
            ``<default_root_dir>/toy_eval/per_image_step_<N>.jsonl`` (rank 0, gathered from all ranks).
    """

    name = "toy"

    def __init__(self, prompts_dir: str, categories: list[str] | None = None, per_category: int | None = 16,
                 images_per_prompt: int = 1, num_inference_steps: int = 25, guidance_scale: float = 5.0,
                 scheduler: str = "ddim", batch_size: int = 16, seed: int = 0, log_samples: int = 16,
                 evaluate_before_fit: bool = False, per_image: bool = False) -> None:
        super().__init__(None, images_per_prompt, num_inference_steps, guidance_scale, scheduler, batch_size, seed,
                         log_samples)
        self.prompts_dir, self.per_category = prompts_dir, per_category
        self.categories = list(categories or EVAL_CATEGORIES)
        self.keys = metric_keys(self.categories)
        self.judge = ToyJudge()  # not a module: nothing of it is broadcast by DDP or saved in checkpoints
        self.evaluate_before_fit = evaluate_before_fit
        self.per_image = per_image
        self.records: list[dict] = []
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None

    def load_items(self) -> list[EvalItem]:
        return load_items(self.prompts_dir, self.categories, self.per_category, self.images_per_prompt, self.seed)

    def settings(self) -> dict:
        return {**super().settings(), "prompts_dir": self.prompts_dir, "per_category": self.per_category}

    def reset(self, pl_module: L.LightningModule) -> None:
        self.sums = torch.zeros(len(self.keys), dtype=torch.float64)
        self.counts = torch.zeros(len(self.keys), dtype=torch.float64)
        self.records = []

    def update(self, images: torch.Tensor, items: Sequence[EvalItem], pl_module) -> list[dict]:
        records = judge_records(images, items, self.judge)
        scores = [r["scores"] for r in records]
        accumulate(self.sums, self.counts, self.keys, items, scores)
        if self.per_image:
            self.records += records
        return scores

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        # every rank reduces the same two vectors, also a rank that had no items
        device = pl_module.device
        sums = trainer.strategy.reduce(self.sums.to(device), reduce_op="sum").cpu()
        counts = trainer.strategy.reduce(self.counts.to(device), reduce_op="sum").cpu()
        if self.per_image:
            self._write_records(trainer)
        return {f"toy/{k}": v for k, v in summarise(self.keys, sums, counts).items()}

    def _write_records(self, trainer: L.Trainer) -> None:
        records = self.records
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:  # every rank joins the gather
            parts: list = [None] * trainer.world_size
            dist.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        if not trainer.is_global_zero:
            return
        order = {item.key: i for i, item in enumerate(self.items)}
        records.sort(key=lambda r: order[r["key"]])
        path = os.path.join(trainer.default_root_dir, "toy_eval", f"per_image_step_{trainer.global_step}.jsonl")
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))

    def _run_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> dict[str, float]:
        metrics = super()._run_and_log(trainer, pl_module, prefix)
        self.after = {k.removeprefix("toy/"): v for k, v in metrics.items()}
        return metrics

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.evaluate_before_fit or self.before is not None:
            return
        self.before = {k.removeprefix("toy/"): v for k, v in self.run(trainer, pl_module).items()}
        for logger in trainer.loggers:  # loggers write on rank 0 only
            logger.log_metrics({f"val/toy/{k}": v for k, v in self.before.items()}, step=trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before is None or self.after is None or not trainer.is_global_zero:
            return
        rank_zero_info(comparison_table(self.before, self.after, len(self.items), self.sampling))
        report = {"before": self.before, "after": self.after, "step": trainer.global_step, "images": len(self.items),
                  "sampling": self.sampling}
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        with atomic_path(os.path.join(trainer.default_root_dir, "toy_eval.json")) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")


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
