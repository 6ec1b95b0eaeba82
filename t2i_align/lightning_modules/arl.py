"""``ARL``: FineRewards' assemble reward-ranked learning.

Each round (one Lightning epoch; ``trainer.max_epochs`` rounds, ``trainer.limit_train_batches`` updates per
round) has two phases:

1. **selection**, when the round's training loader is built (:class:`~t2i_align.datamodules.RankedPairsData`
   calls :meth:`ARL.prepare_round`): every prompt gets K candidates from the current weights, each candidate
   is scored by every reward *against its own prompt*, and the candidate with the smallest sum of per-reward
   ranks is kept (:func:`~t2i_align.rewards.ranking.select_candidates`). Ranks split the prompts r::W; each
   prompt's kept image and scores are written atomically, so an interrupted selection resumes where it
   stopped. Rank 0 then writes ``round_<r>/metadata.jsonl`` (TokenCompose layout) for the whole round.
2. **fine-tuning** with the plain noise-prediction loss on the kept pairs (as :class:`Finetune`).

Round r generates with the weights left by round r-1: the LoRA keeps training across rounds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from t2i_align.common import derive_seed
from t2i_align.datamodules.prompts import Prompt
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.io import atomic_path, save_png
from t2i_align.lightning_modules.base import AlignmentModule, FrozenExperts, batch_pairs
from t2i_align.rewards.base import Reward
from t2i_align.rewards.ranking import average_ranks, rank_sum, select_candidates


class ARL(AlignmentModule):
    """Assemble reward-ranked learning: per round, keep the best-ranked of K candidates per prompt, then
    fine-tune on the kept pairs.

    Args:
        rewards: name -> reward (``class_path`` each); every one ranks the candidates.
        candidates: K candidates per prompt (FineRewards: 10).
        output_dir: where the rounds are written (default ``<trainer.default_root_dir>/arl``).
        sampling: sampler settings of the candidates.
        generation_batch_size: images per generation / scoring call.
        min_scores: reward name -> the score a prompt's kept candidate must reach to be trained on (RAFT-style
            filtering: prompts below it are left out of the round); None keeps every prompt (FineRewards).
    """

    def __init__(
        self,
        *args,
        rewards: Mapping[str, Reward],
        candidates: int = 10,
        output_dir: str | None = None,
        sampling: SamplingSettings = SamplingSettings(),
        generation_batch_size: int = 16,
        min_scores: Mapping[str, float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not rewards:
            raise ValueError("ARL needs at least one reward")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        unknown = sorted(set(min_scores or ()) - set(rewards))
        if unknown:
            raise ValueError(f"ARL: min_scores names rewards that are not given: {unknown} (rewards: {sorted(rewards)})")
        self.min_scores = dict(min_scores or {})
        self.experts = FrozenExperts(**rewards)
        self.candidates, self.output_dir = candidates, output_dir
        self.sampling = sampling
        self.generation_batch_size = generation_batch_size

    @property
    def rewards(self) -> dict[str, Reward]:
        return dict(self.experts.items())

    def training_step(self, batch: dict, batch_idx: int):
        """Noise-prediction loss on the round's kept pairs (as :class:`Finetune`)."""
        pairs = batch_pairs(batch, "ARL")
        loss = self.generator.denoising_loss(pairs["pixel_values"], pairs["captions"], self.step_rng(),
                                           caption_dropout=self.caption_dropout)
        return self.finish_step(loss, batch_size=len(pairs["captions"]))

    def round_dir(self, round_index: int) -> Path:
        root = Path(self.output_dir) if self.output_dir else Path(self.trainer.default_root_dir) / "arl"
        return root / f"round_{round_index}"

    # --------------------------------------------------------------------------------- selection
    @torch.no_grad()
    def score_candidates(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every reward's score of each image against its own prompt (``images[i]`` with ``prompts[i]``)."""
        return {name: reward(images, list(prompts)).float().cpu() for name, reward in self.rewards.items()}

    @torch.no_grad()
    def select(self, round_index: int, prompt: Prompt, index: int) -> tuple[torch.Tensor, dict]:
        """Generate the K candidates of one prompt, score and rank them; return the kept image and a record."""
        k = self.candidates
        seeds = [derive_seed(self.seed, "arl", round_index, prompt.source, prompt.id, j) for j in range(k)]
        images, scores = [], {name: [] for name in self.rewards}
        for start in range(0, k, self.generation_batch_size):
            chunk = seeds[start:start + self.generation_batch_size]
            batch = self.sample([prompt.text] * len(chunk), chunk, self.sampling).images
            for name, s in self.score_candidates(batch, [prompt.text] * len(chunk)).items():
                scores[name].append(s)
            images.append(batch.cpu())
        scores = {name: torch.cat(s) for name, s in scores.items()}
        kept = int(select_candidates(scores))
        record = {
            "index": index, "text": prompt.text, "source": prompt.source, "id": prompt.id, "round": round_index,
            "global_step": self.trainer.global_step if self._trainer is not None else None, "kept": kept, "seeds": seeds,
            "scores": {name: s.tolist() for name, s in scores.items()},
            "ranks": {name: average_ranks(s).tolist() for name, s in scores.items()},
            "rank_sum": rank_sum(scores).tolist(),
        }
        return torch.cat(images)[kept], record

    def prepare_round(self, round_index: int, prompts: Sequence[Prompt]) -> Path:
        """Select this round's training pairs (resumable, split across ranks); returns its metadata.jsonl."""
        folder = self.round_dir(round_index)
        metadata = folder / "metadata.jsonl"
        if metadata.exists():
            return metadata
        strategy = self.trainer.strategy
        rank, world = self.trainer.global_rank, self.trainer.world_size
        modes = {m: m.training for m in self.modules()}  # restored one by one: frozen parts stay in eval
        self.eval()
        try:
            for index in range(rank, len(prompts), world):
                record_path = folder / "selection" / f"{index:06d}.json"
                if record_path.exists():
                    continue  # written by an interrupted run
                image, record = self.select(round_index, prompts[index], index)
                save_png(image, folder / "images" / f"{index:06d}.png")
                record_path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(record_path) as tmp:
                    tmp.write_text(json.dumps(record) + "\n")
        finally:
            for module, training in modes.items():
                module.training = training
        strategy.barrier("arl_selection")
        if rank == 0:
            lines = []
            for index in range(len(prompts)):
                record = json.loads((folder / "selection" / f"{index:06d}.json").read_text())
                if self.passes(record):
                    lines.append(json.dumps({"file_name": f"images/{index:06d}.png", "text": record["text"]}))
            if not lines:
                raise RuntimeError(f"ARL round {round_index}: no prompt's kept candidate reached min_scores "
                                   f"{self.min_scores} ({folder / 'selection'})")
            with atomic_path(metadata) as tmp:
                tmp.write_text("\n".join(lines) + "\n")
            self.log_round(round_index, folder, len(prompts))
        strategy.barrier("arl_metadata")
        return metadata

    def passes(self, record: dict) -> bool:
        """Does the kept candidate of a selection record reach every ``min_scores``?"""
        return all(record["scores"][name][record["kept"]] >= low for name, low in self.min_scores.items())

    def log_round(self, round_index: int, folder: Path, count: int) -> None:
        """Rank 0: mean kept and mean candidate score per reward, into ``round_<r>/summary.json`` and the loggers."""
        kept, mean = {n: 0.0 for n in self.rewards}, {n: 0.0 for n in self.rewards}
        for index in range(count):
            record = json.loads((folder / "selection" / f"{index:06d}.json").read_text())
            for name, scores in record["scores"].items():
                kept[name] += scores[record["kept"]] / count
                mean[name] += sum(scores) / len(scores) / count
        trained = sum(self.passes(json.loads((folder / "selection" / f"{i:06d}.json").read_text())) for i in range(count))
        summary = {"round": round_index, "prompts": count, "trained_on": trained, "kept": kept, "candidates": mean}
        with atomic_path(folder / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
        metrics = {f"arl/kept_{n}": v for n, v in kept.items()} | {f"arl/mean_{n}": v for n, v in mean.items()}
        metrics["arl/trained_on"] = trained
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics | {"arl/round": round_index}, step=self.trainer.global_step)
