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
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.io import atomic_path
from t2i_align.toyworld.evaluation.scoring import (
    accumulate,
    judge_records,
    load_items,
    metric_keys,
    summarise,
)
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
            when fit ends, rank 0 prints a short before/after summary with paired intervals (the two passes
            judge the same items) and writes every metric to ``<default_root_dir>/toy_eval.json``.
        per_image: also write every image's result (item key, category, prompt, seed, metrics and each
            clause's verdict: ``toyworld.evaluation.metrics.clause_verdicts``), one JSON line per image in item order, to
            ``<default_root_dir>/toy_eval/per_image_step_<N>.jsonl`` (rank 0, gathered from all ranks).
    """

    name = "toy"
    expert_attributes = ("judge",)  # moved to the module's device by run() (when it has a `to`)

    def __init__(self, prompts_dir: str, categories: list[str] | None = None, per_category: int | None = 16,
                 images_per_prompt: int = 1,
                 sampling: SamplingSettings = SamplingSettings(num_inference_steps=25, guidance_scale=5.0),
                 batch_size: int = 16, seed: int = 0, log_samples: int = 16, evaluate_before_fit: bool = False,
                 per_image: bool = False) -> None:
        super().__init__(None, images_per_prompt, sampling, batch_size, seed, log_samples)
        self.prompts_dir, self.per_category = prompts_dir, per_category
        self.categories = list(categories or EVAL_CATEGORIES)
        self.keys = metric_keys(self.categories)
        self.judge = ToyJudge()  # not a module: nothing of it is broadcast by DDP or saved in checkpoints
        self.evaluate_before_fit = evaluate_before_fit
        self.per_image = per_image
        self.records: list[dict] = []  # this rank's per-image records of the running pass
        self.pass_records: list[dict] = []  # every rank's records of the last finished pass, in item order
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None
        self.before_records: list[dict] | None = None
        self.after_records: list[dict] | None = None

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
        self.records += records
        return scores

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        # every rank reduces the same two vectors, also a rank that had no items
        device = pl_module.device
        sums = trainer.strategy.reduce(self.sums.to(device), reduce_op="sum").cpu()
        counts = trainer.strategy.reduce(self.counts.to(device), reduce_op="sum").cpu()
        # the records are gathered only when something reads them: the files, or the fit's before/after summary
        self.pass_records = self._gather_records(trainer) if self.per_image or self.evaluate_before_fit else []
        if self.per_image and trainer.is_global_zero:
            path = os.path.join(trainer.default_root_dir, "toy_eval", f"per_image_step_{trainer.global_step}.jsonl")
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.pass_records))
        return {f"toy/{k}": v for k, v in summarise(self.keys, sums, counts).items()}

    def _gather_records(self, trainer: L.Trainer) -> list[dict]:
        """Every rank's per-image records of this pass, in item order (the same list on every rank)."""
        records = self.records
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:  # every rank joins the gather
            parts: list = [None] * trainer.world_size
            dist.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        order = {item.key: i for i, item in enumerate(self.items)}
        return sorted(records, key=lambda r: order[r["key"]])

    def _run_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> dict[str, float]:
        metrics = super()._run_and_log(trainer, pl_module, prefix)
        self.after = {k.removeprefix("toy/"): v for k, v in metrics.items()}
        self.after_records = self.pass_records
        return metrics

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.evaluate_before_fit or self.before is not None:
            return
        self.before = {k.removeprefix("toy/"): v for k, v in self.run(trainer, pl_module).items()}
        self.before_records = self.pass_records
        for logger in trainer.loggers:  # loggers write on rank 0 only
            logger.log_metrics({f"val/toy/{k}": v for k, v in self.before.items()}, step=trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank 0 writes ``toy_eval.json`` (every metric before and after, and each headline metric's paired
        difference, ``paired``) and prints the short summary of :func:`comparison_table`."""
        if self.before is None or self.after is None or not trainer.is_global_zero:
            return
        paired = None
        if self.before_records and self.after_records:  # the same items, judged before and after
            paired = paired_differences(self.before_records, self.after_records)
        report = {"before": self.before, "after": self.after, "step": trainer.global_step, "images": len(self.items),
                  "sampling": self.sampling.as_dict()}
        if paired:
            report["paired"] = {metric: vars(d) for metric, d in paired.items()}
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        path = os.path.join(trainer.default_root_dir, "toy_eval.json")
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        rank_zero_info(comparison_table(self.before, self.after, evaluation_size(self.items), self.sampling.as_dict(),
                                        paired, path))


# ------------------------------------------------------------------------------------- before/after summary
#: The metrics of the short before/after summary (means over categories); every metric is in ``toy_eval.json``.
HEADLINE = ("all_clauses", "object_accuracy", "object_missing", "attribute_wrong")
#: The ToyWorld evaluation split has 100 prompts per category (``commands.toyworld_build``); fewer make a smoke check.
FULL_PER_CATEGORY = 100


def comparison_table(before: dict[str, float], after: dict[str, float], size: tuple[int, int, int], sampling: dict,
                     paired: dict | None = None, report: str | None = None) -> str:
    """A few lines: the headline metrics before and after training, each change with its 95 % paired interval
    when ``paired`` has one (:func:`paired_differences`), what the numbers can and cannot say, and where the
    full report is. ``size``: (categories, prompts per category, images per prompt), :func:`evaluation_size`."""
    categories, prompts, images = size
    steps, cfg, scheduler = (sampling.get(k) for k in ("num_inference_steps", "guidance_scale", "scheduler"))
    title = (f"ToyWorld, before -> after training ({categories} categories x {prompts} prompts x {images} "
             f"image{'s' if images > 1 else ''} per prompt; {steps} {scheduler} steps, CFG {cfg})")
    change = "change [95 % paired interval]" if paired else "change"
    lines = [title, f"  {'mean over categories':22s} {'before':>6s} {'after':>6s}  {change}"]
    for key in HEADLINE:
        if key in before and key in after:
            d = (paired or {}).get(key)
            difference = str(d) if d is not None else f"{after[key] - before[key]:+.3f}"
            lines.append(f"  {key:22s} {before[key]:6.3f} {after[key]:6.3f}  {difference}")
    if paired:
        lines.append("  Same prompts and seeds before and after; an interval that holds 0 is no evidence of a change.")
    else:
        lines.append(f"  No interval. One image moves a category by "
                     f"{1 / max(prompts * images, 1):.3f}: read small changes as noise.")
    if prompts < FULL_PER_CATEGORY:
        lines.append(f"  {prompts} prompts per category make this a smoke check, not a result "
                     f"(results: python -m t2i_align.studies.compare_methods).")
    if report:
        lines.append(f"  Every metric and category: {report}")
    return "\n".join(lines)


def evaluation_size(items: Sequence[EvalItem]) -> tuple[int, int, int]:
    """(categories, prompts per category, images per prompt) of items keyed ``<category>/<prompt id>/<k>`` with
    the category as ``group``; the smallest category and the fewest images when they differ."""
    prompts: dict[str, set[str]] = {}
    images: dict[str, int] = {}
    for item in items:
        prompt = item.key.rsplit("/", 1)[0]
        prompts.setdefault(item.group, set()).add(prompt)
        images[prompt] = images.get(prompt, 0) + 1
    if not prompts:
        return 0, 0, 0
    return len(prompts), min(len(p) for p in prompts.values()), min(images.values())


def paired_differences(before: Sequence[dict], after: Sequence[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """``after - before`` of each :data:`HEADLINE` metric (mean over categories) with its 95 % paired bootstrap
    interval (:func:`t2i_align.stats.paired_bootstrap`: per prompt the mean over its images, prompts resampled
    within categories), from the per-image records of two passes over the same items."""
    from t2i_align.stats import paired_bootstrap, per_prompt_means

    return {metric: paired_bootstrap(per_prompt_means(before, metric), per_prompt_means(after, metric),
                                     resamples=resamples, seed=seed)
            for metric in HEADLINE}
