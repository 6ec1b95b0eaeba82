"""The reward interface shared by ReFL, ARL and evaluation: ``reward(images, prompts) -> Tensor[B]``.

``images`` are float ``B x 3 x H x W`` in [0, 1] (decoded, not rounded to uint8), one prompt per image;
higher is better. A reward is a ``torch.nn.Module`` that a method keeps frozen and *outside* its module
tree, in ``self.experts = FrozenExperts(reward=...)``
(:class:`~t2i_align.lightning_modules.base.FrozenExperts`): DDP does not broadcast it, checkpoints do not
hold it, ``module.train()`` does not switch its dropout on, and :class:`AlignmentModule` moves it to the
module's device when fit, validate, test or predict start. ``differentiable`` says whether the gradient of
the score reaches the pixels (ReFL needs it; ranking and evaluation do not).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from t2i_align.experts.base import check_images


class Reward(torch.nn.Module):
    """Base class: subclasses implement :meth:`score`; calling the reward checks the inputs first."""

    differentiable: bool = False

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        # the range check reads values: run it without building graph
        with torch.no_grad():
            check_images(images, prompts, type(self).__name__)
        scores = self.score(images, list(prompts))
        if scores.shape != (len(prompts),):
            raise RuntimeError(f"{type(self).__name__}.score returned shape {tuple(scores.shape)}, expected ({len(prompts)},)")
        return scores

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class WeightedSum(Reward):
    """``sum_i w_i * reward_i``; differentiable when every part is.

    Args:
        rewards: name -> reward (the names key the per-part scores in :meth:`parts`).
        weights: name -> weight (default 1 for each).
    """

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not rewards:
            raise ValueError("WeightedSum needs at least one reward")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(rewards))
        if unknown:
            raise ValueError(f"WeightedSum: weights for unknown rewards {unknown} (rewards: {sorted(rewards)})")
        self.rewards = torch.nn.ModuleDict(dict(rewards))
        self.weights = {name: float(weights.get(name, 1.0)) for name in rewards}
        self.differentiable = all(r.differentiable for r in rewards.values())

    def parts(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {name: reward(images, prompts) for name, reward in self.rewards.items()}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return sum(self.weights[name] * s for name, s in self.parts(images, prompts).items())
