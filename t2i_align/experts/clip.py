"""A CLIP image tower as a feature extractor (FID features; ToyWorld's FID uses its own CLIP)."""

from __future__ import annotations

import torch

from t2i_align.diffusion.loading import resolve_pretrained
from t2i_align.experts.base import expert_pixels


class CLIPImageFeatures(torch.nn.Module):
    """Projected CLIP image embeddings of float images in [0, 1] (resized to the tower's input size,
    normalised with the processor's mean and std). ``num_features`` tells torchmetrics the width.

    Args:
        pretrained: hub id or local folder of a transformers ``CLIPModel`` (+ image processor config).
    """

    def __init__(self, pretrained: str) -> None:
        super().__init__()
        from transformers import CLIPImageProcessor, CLIPModel

        pretrained = resolve_pretrained(pretrained, "CLIP model")
        model = CLIPModel.from_pretrained(pretrained, dtype=torch.float32).eval().requires_grad_(False)
        self.vision, self.projection = model.vision_model, model.visual_projection
        processor = CLIPImageProcessor.from_pretrained(pretrained)
        self.size = model.config.vision_config.image_size
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)
        self.num_features = model.config.projection_dim
        self.tag = "clip"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = expert_pixels(images, self.size, self.mean, self.std, self.projection.weight.dtype)
        return self.projection(self.vision(pixel_values=pixels).pooler_output).double()
