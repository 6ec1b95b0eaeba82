"""FineRewards' SAM reward (semantic alignment): tag the objects in the image, ask a judge how likely each
tag is in the scene the prompt describes, and normalise the summed scores.

FineRewards' code scores certain / may / unlikely as 3 / 2 / 1 and returns ``(S - 2L) / (2L)`` for L tags
with score sum S, so the reward lies in [-0.5, 0.5]. An image with no tag at all gets -0.5 (nothing the
prompt asked for is there; the code would divide by zero). Not differentiable: for ranking (ARL) and
evaluation.
"""

from __future__ import annotations

from typing import Mapping

import torch

from t2i_align.experts.base import move_plain_parts
from t2i_align.experts.likelihood import LABELS, LikelihoodJudge
from t2i_align.experts.tagger import Tagger
from t2i_align.rewards.base import Reward

CODE_SCORES = {"certain": 3.0, "may": 2.0, "unlikely": 1.0}


def sam_score(labels: list[str], scores: Mapping[str, float] = CODE_SCORES) -> float:
    """``(S - 2L) / (2L)`` of one image's tag labels (-0.5 without tags)."""
    if not labels:
        return -0.5
    total = sum(scores[label] for label in labels)
    return (total - 2 * len(labels)) / (2 * len(labels))


class SAMReward(Reward):
    """FineRewards' SAM reward: tag the image, judge how likely each tag is given the prompt.

    Args:
        tagger: the tagging expert (``class_path``; ToyWorld: ``t2i_align.toyworld.experts.sam_reward.ToyTagger``).
        judge: the likelihood judge (``t2i_align.experts.likelihood.CausalLMJudge`` or ToyWorld's rules).
        scores: points per label (FineRewards' code: certain 3, may 2, unlikely 1).

    A tagger or judge that holds models is an ``nn.Module`` (:class:`~t2i_align.experts.base.ExpertModule`:
    ``CaptionNounTagger``, ``CausalLMJudge``), so a submodule here: ``.to(device)`` moves it with the reward, which the
    method's :class:`~t2i_align.lightning_modules.base.FrozenExperts` moves to the module's device when fit, validate,
    test or predict start; ``to`` also reaches a part that is not a module but has its own ``to``.
    """

    differentiable = False

    def __init__(self, tagger: Tagger, judge: LikelihoodJudge, scores: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.tagger, self.judge = tagger, judge
        self.scores = dict(scores or CODE_SCORES)
        if set(self.scores) != set(LABELS):
            raise ValueError(f"SAMReward scores must give points for exactly {list(LABELS)}, got {sorted(self.scores)}")

    def to(self, *args, **kwargs) -> SAMReward:
        super().to(*args, **kwargs)
        move_plain_parts([self.tagger, self.judge], *args, **kwargs)
        return self

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        values = []
        for prompt, tags in zip(prompts, self.tagger.tags(images)):
            labels = self.judge(prompt, tags)
            if len(labels) != len(tags) or not set(labels) <= set(LABELS):
                raise RuntimeError(f"the judge answered {labels} for tags {tags}: expected one of {list(LABELS)} per tag")
            values.append(sam_score(labels, self.scores))
        return torch.tensor(values, dtype=torch.float32, device=images.device)
