"""How well rewards rank a model's own samples, measured against a reference score.

Every prompt gets ``candidates`` images (fixed seeds) from the current weights; each is scored by every reward and
by the ``reference`` (on ToyWorld: :class:`~t2i_align.toyworld.experts.judge_reward.JudgeReward`, the exact judge).
Logged as ``<val|test>/rewards/...``:

* ``<name>/pairwise``: over pairs of candidates *of the same prompt* whose reference scores differ, the share the
  reward orders like the reference (a reward tie counts 1/2; 0.5 = chance). This is what a selection among a
  prompt's candidates (ARL) or a reward-gradient method (ReFL) relies on.
* ``<name>/concordance``: the same over all pairs of candidates, any prompts (Harrell's C; an AUC for a binary
  reference).
* ``kept/<rule>``: the mean reference score of the candidate each rule keeps per prompt: ``random`` (the mean over
  the candidates), ``rank_sum`` (ARL's rule over the ``rank_sum`` rewards: :func:`~t2i_align.rewards.ranking.select_candidates`),
  each reward alone, and ``reference`` (the best possible).

Measured before and after training, a fall of a reward's agreement while its own score rises is reward hacking.
Rank 0 also writes every candidate's scores to ``<default_root_dir>/reward_agreement/step_<N>.jsonl``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence

import lightning as L
import torch
import torch.distributed as dist

from t2i_align.callbacks.evaluation import GenerativeEvaluation
from t2i_align.common import EvalItem
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.io import atomic_path
from t2i_align.rewards.base import Reward
from t2i_align.rewards.ranking import select_candidates

__all__ = ["RewardAgreement", "concordance", "kept_reference", "pairwise_agreement"]


def concordance(reward: torch.Tensor, reference: torch.Tensor) -> float:
    """Over pairs with different ``reference`` values, the share ordered alike by ``reward`` (ties 1/2); NaN when the
    reference is constant."""
    r, ref = reward.double(), reference.double()
    differ = ref[:, None] > ref[None, :]  # i better than j by the reference
    if not differ.any():
        return float("nan")
    agree = (r[:, None] > r[None, :]).double() + 0.5 * (r[:, None] == r[None, :]).double()
    return float(agree[differ].mean())


def pairwise_agreement(reward: torch.Tensor, reference: torch.Tensor) -> float:
    """:func:`concordance` over the pairs within each row of ``[prompts, K]`` scores, pooled over prompts."""
    agree, pairs = 0.0, 0
    for r, ref in zip(reward.double(), reference.double()):
        differ = ref[:, None] > ref[None, :]
        pairs += int(differ.sum())
        both = (r[:, None] > r[None, :]).double() + 0.5 * (r[:, None] == r[None, :]).double()
        agree += float(both[differ].sum())
    return agree / pairs if pairs else float("nan")


def kept_reference(scores: Mapping[str, torch.Tensor], reference: torch.Tensor,
                   rank_sum: Sequence[str] | None = None) -> dict[str, float]:
    """Mean reference score of the candidate each selection rule keeps, from ``[prompts, K]`` scores (``rank_sum``:
    the rewards whose ranks are summed; default all)."""
    rows = torch.arange(reference.shape[0])
    summed = {n: scores[n] for n in (rank_sum or scores)}
    out = {"random": float(reference.double().mean()),
           "rank_sum": float(reference[rows, select_candidates(summed)].double().mean())}
    for name, s in scores.items():
        out[name] = float(reference[rows, select_candidates({name: s})].double().mean())
    out["reference"] = float(reference.double().amax(1).mean())
    return out


class RewardAgreement(GenerativeEvaluation):
    """Rewards against a reference on ``candidates`` samples per prompt (see the module docstring).

    Args:
        rewards: name -> reward under test.
        reference: the score they are measured against (the judge on ToyWorld: an oracle).
        candidates: images per prompt (ARL: 10).
        rank_sum: the rewards whose ranks the ``rank_sum`` rule sums (default: all).
        prompts, sampling, batch_size, seed, log_samples: as :class:`GenerativeEvaluation`.
    """

    name = "rewards"

    def __init__(self, rewards: Mapping[str, Reward], reference: Reward, prompts: list | None = None,
                 candidates: int = 10, sampling: SamplingSettings = SamplingSettings(num_inference_steps=25),
                 batch_size: int = 10, seed: int = 0, log_samples: int = 0, rank_sum: list[str] | None = None) -> None:
        super().__init__(prompts, candidates, sampling, batch_size, seed, log_samples)
        if not rewards:
            raise ValueError("RewardAgreement needs at least one reward")
        if "reference" in rewards:
            raise ValueError("RewardAgreement: 'reference' is the reference's name; give the reward another name")
        unknown = sorted(set(rank_sum or ()) - set(rewards))
        if unknown:
            raise ValueError(f"RewardAgreement: rank_sum names rewards that are not given: {unknown}")
        self.rewards, self.reference, self.rank_sum = dict(rewards), reference, rank_sum
        self._rows: list[dict] = []

    def frozen_experts(self) -> list:
        return [*self.rewards.values(), self.reference]  # run() moves them to the module's device

    def reset(self, pl_module: L.LightningModule) -> None:
        self._rows = []
        for expert in self.frozen_experts():  # rewards are nn.Modules
            expert.to(pl_module.device).eval()

    def update(self, images: torch.Tensor, items: Sequence[EvalItem], pl_module: L.LightningModule) -> list[dict]:
        prompts = [it.prompt for it in items]
        scores = {name: r(images, prompts).float().cpu() for name, r in {**self.rewards, "reference": self.reference}.items()}
        rows = [{"key": it.key, "prompt": it.prompt, "seed": it.seed, **{n: float(s[i]) for n, s in scores.items()}}
                for i, it in enumerate(items)]
        self._rows += rows
        return [{k: v for k, v in row.items() if k in scores} for row in rows]

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        rows = self._rows
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            parts: list = [None] * trainer.world_size
            dist.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        order = {it.key: i for i, it in enumerate(self.items)}
        rows = sorted(rows, key=lambda r: order[r["key"]])
        if trainer.is_global_zero:
            path = os.path.join(trainer.default_root_dir, "reward_agreement", f"step_{trainer.global_step}.jsonl")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        by_prompt: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_prompt[r["key"].rsplit("/", 1)[0]].append(r)  # items are "<source>/<id>/<k>"
        names = [*self.rewards, "reference"]
        table = {n: torch.tensor([[r[n] for r in group] for group in by_prompt.values()]) for n in names}
        reference = table.pop("reference")
        metrics = {f"rewards/kept/{rule}": v for rule, v in kept_reference(table, reference, self.rank_sum).items()}
        for name, s in table.items():
            metrics[f"rewards/{name}/pairwise"] = pairwise_agreement(s, reference)
            metrics[f"rewards/{name}/concordance"] = concordance(s.flatten(), reference.flatten())
        return metrics
