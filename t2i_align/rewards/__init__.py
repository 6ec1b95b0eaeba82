"""Rewards ``(images in [0, 1], prompts) -> Tensor[B]`` for ReFL, ARL and evaluation (pick one by ``class_path``)."""

from t2i_align.rewards.base import Reward, WeightedSum
from t2i_align.rewards.caption import CaptionReward, PromptLikelihoodReward
from t2i_align.rewards.clip import CLIPReward
from t2i_align.rewards.sam import SAMReward

__all__ = ["CLIPReward", "CaptionReward", "PromptLikelihoodReward", "Reward", "SAMReward", "WeightedSum"]
