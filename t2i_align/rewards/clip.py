"""CLIP reward: the cosine of the projected CLIP image and prompt embeddings (RealignDiff's baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2i_align.diffusion.loading import resolve_pretrained
from t2i_align.experts.base import expert_pixels
from t2i_align.rewards.base import Reward


def _projected(out) -> torch.Tensor:
    """transformers 5 wraps the projected features in an output object (``pooler_output``); 4 returned them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPReward(Reward):
    """``cos(CLIP_image(image), CLIP_text(prompt))`` in [-1, 1], differentiable in the pixels.

    Args:
        pretrained: hub id or local folder of a transformers ``CLIPModel`` with its processor files
            (e.g. ``openai/clip-vit-large-patch14``; ToyWorld: ``models/toyworld/clip``).
    """

    differentiable = True

    def __init__(self, pretrained: str) -> None:
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor

        pretrained = resolve_pretrained(pretrained, "CLIP model")
        self.model = CLIPModel.from_pretrained(pretrained, dtype=torch.float32).eval().requires_grad_(False)
        processor = CLIPProcessor.from_pretrained(pretrained)
        self.tokenizer = processor.tokenizer
        self.size = self.model.config.vision_config.image_size
        self.register_buffer("mean", torch.tensor(processor.image_processor.image_mean), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_processor.image_std), persistent=False)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.mean.device)
        return _projected(self.model.get_text_features(**tokens))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = expert_pixels(images, self.size, self.mean, self.std, self.model.dtype)
        return _projected(self.model.get_image_features(pixel_values=pixels))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return F.cosine_similarity(self.image_features(images).float(), self.text_features(prompts).float(), dim=-1)
