"""``ReFL``: reward feedback learning (ImageReward) as used by RealignDiff's coarse stage.

One training step (RealignDiff Section III-B-1, Eq. 5; the sampling chain and the hinge are ImageReward's code,
THUDM/ImageReward, ImageReward/ReFL.py: 40 steps, m = randint(30, 39), loss relu(2 - r)):

1. sample the batch's prompts with the ``refl`` gradient policy: steps ``0 .. m-1`` without gradient,
   ``m ~ U[min_step, max_step]``, one UNet call with gradient at step ``m``, then x0 predicted in one
   step from x_m and decoded to images in [0, 1];
2. reward loss ``reward_weight * phi(r)``, ``r = reward(images, prompts)``;
3. the pre-training loss L_pre (plain noise prediction) on a batch of real image-caption pairs,
   summed with the reward loss every step or alternated with it (``pretrain_loss``).

``phi``: ``relu_margin`` is ImageReward's code, ``ReLU(margin - r)`` (margin 2). RealignDiff Eq. 5
writes "phi is the ReLU" applied to the reward itself; minimising ReLU(r) would *lower* the reward,
so the ReLU is read as ImageReward's hinge. ``linear`` is ``-r``.
"""

from __future__ import annotations

from typing import Literal

import torch

from t2i_align.diffusion.policies import ReFLPolicy
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.lightning_modules.base import AlignmentModule, FrozenExperts, batch_pairs, batch_prompts
from t2i_align.rewards.base import Reward


class ReFL(AlignmentModule):
    """Reward feedback learning: a reward loss on one-step-denoised samples plus L_pre on real pairs.

    Args:
        reward: the reward model (``class_path``), e.g. :class:`~t2i_align.rewards.CaptionReward` with
            ``differentiable: true``. It must be differentiable in the pixels.
        reward_weight: lambda (1e-3 in ImageReward and RealignDiff).
        reward_loss: ``relu_margin`` (ReLU(margin - r)) or ``linear`` (-r).
        margin: the hinge of ``relu_margin`` (2.0 as in ImageReward's code).
        sampling: the training chain: T = ``num_inference_steps`` (ImageReward's code 40, RealignDiff 50), its
            ``scheduler`` (``ddpm`` as in ImageReward's code, or ``ddim``) and CFG (1.0: none, as in ImageReward's
            code).
        min_step: first step the grad step m can be (ImageReward: 30 of 40).
        max_step: last step the grad step m can be (ImageReward: 39 of 40).
        pretrain_loss: ``sum`` (reward loss + L_pre every step), ``alternate`` (odd batches reward, even
            batches L_pre) or ``none`` (no L_pre: images drift from the base model's; RealignDiff Section III-B-1
            adds L_pre, Eq. 5, against overfitting).
        pretrain_weight: weight of L_pre.
    """

    def __init__(
        self,
        *args,
        reward: Reward,
        reward_weight: float = 1e-3,
        reward_loss: Literal["relu_margin", "linear"] = "relu_margin",
        margin: float = 2.0,
        sampling: SamplingSettings = SamplingSettings(num_inference_steps=40, guidance_scale=1.0, scheduler="ddpm"),
        min_step: int = 30,
        max_step: int = 39,
        pretrain_loss: Literal["sum", "alternate", "none"] = "sum",
        pretrain_weight: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not reward.differentiable:
            raise ValueError(f"ReFL needs a reward whose gradient reaches the pixels; {type(reward).__name__} is not "
                             "differentiable (CaptionReward: set differentiable: true)")
        if reward_loss not in ("relu_margin", "linear"):
            raise ValueError(f"reward_loss must be 'relu_margin' or 'linear', got {reward_loss!r}")
        if pretrain_loss not in ("sum", "alternate", "none"):
            raise ValueError(f"pretrain_loss must be 'sum', 'alternate' or 'none', got {pretrain_loss!r}")
        self.experts = FrozenExperts(reward=reward)
        self.reward_weight, self.reward_loss, self.margin = reward_weight, reward_loss, margin
        self.policy = ReFLPolicy(min_step, max_step)
        if max_step >= sampling.num_inference_steps:
            raise ValueError(f"max_step={max_step} must be < sampling.num_inference_steps={sampling.num_inference_steps}")
        self.sampling = sampling
        self.pretrain_loss, self.pretrain_weight = pretrain_loss, pretrain_weight

    @property
    def reward(self) -> Reward:
        return self.experts["reward"]

    # ---------------------------------------------------------------------------------- losses
    def phi(self, rewards: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.margin - rewards) if self.reward_loss == "relu_margin" else -rewards

    def refl_loss(self, prompts: list[str], rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(reward loss, rewards, grad step m) for one batch of prompts; noise and m come from ``rng``."""
        seeds = torch.randint(0, 2**62, (len(prompts),), generator=rng).tolist()
        out = self.generator.sample(prompts, seeds, self.sampling, policy=self.policy, policy_rng=rng)
        rewards = self.reward(out.images, prompts)
        return self.reward_weight * self.phi(rewards).mean(), rewards, out.plan_grad_steps[0]

    def training_step(self, batch: dict, batch_idx: int):
        # batches_started is 1 at the first batch: alternate starts with the reward
        reward_turn = self.pretrain_loss != "alternate" or self.batches_started % 2 == 1
        pre_turn = self.pretrain_loss == "sum" or (self.pretrain_loss == "alternate" and not reward_turn)
        rng = self.step_rng()
        loss = torch.zeros((), device=self.device)
        logs = {}
        if reward_turn:
            prompts = batch_prompts(batch, "ReFL")
            reward_loss, rewards, m = self.refl_loss(prompts, rng)
            loss = loss + reward_loss
            logs.update({"train/reward": rewards.detach().mean(), "train/reward_loss": reward_loss.detach(),
                         "train/refl_step": float(m)})
        if pre_turn:
            pairs = batch_pairs(batch, f"ReFL with pretrain_loss={self.pretrain_loss!r} (L_pre; or pretrain_loss: none)")
            pre = self.generator.denoising_loss(pairs["pixel_values"], pairs["captions"], rng,
                                               caption_dropout=self.caption_dropout)
            loss = loss + self.pretrain_weight * pre
            logs["train/pretrain_loss"] = pre.detach()
        return self.finish_step(loss, logs)
