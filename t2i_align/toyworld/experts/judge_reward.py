"""The ToyWorld judge as a reward: the oracle of the reward-based methods' positive controls.

A reward that knows the answer: if ARL selecting with it (or a method ranking with it) does not improve judged
alignment, the machinery is wrong; if it does and a learned reward does not, the learned reward is the limit.
Anything trained or selected with it is an **oracle upper bound**: it is the evaluation judge itself.
"""

from __future__ import annotations

import torch

from t2i_align.rewards.base import Reward
from t2i_align.toyworld.evaluation.metrics import score_image
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.world import parse_prompt


class JudgeReward(Reward):
    """``all_clauses + tifa / 2`` of the image for its prompt, in [0, 1.5]: 1 for an image that meets every clause,
    plus half the share of the prompt's questions the judge answers right, so that partly right images are ordered
    too (and ``score >= 1`` exactly when every clause is met). Not differentiable (the judge reads detected objects).

    Args:
        judge: the ToyWorld judge (a default one when None).
    """

    differentiable = False

    def __init__(self, judge: ToyJudge | None = None) -> None:
        super().__init__()
        self.judge = judge or ToyJudge()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        found = self.judge.detect_batch(images.detach().float().cpu())
        scores = [score_image(parse_prompt(p), f) for p, f in zip(prompts, found)]
        return torch.tensor([s["all_clauses"] + s["tifa"] / 2 for s in scores], device=images.device)
