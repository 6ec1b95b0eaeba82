"""CoMat's fidelity discriminator (Section 4.2): a LoRA'd copy of the base UNet with a per-pixel head, and
the non-saturating GAN losses."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2i_align.diffusion.generator import LoraSettings


def discriminator_adamw(params) -> torch.optim.Optimizer:
    # CoMat's code: AdamW lr 5e-5, betas (0, 0.999) for the discriminator
    return torch.optim.AdamW(params, lr=5e-5, betas=(0.0, 0.999), weight_decay=1e-2)


class LatentDiscriminator(nn.Module):
    """CoMat's fidelity discriminator: a UNet (initialised from the base model's, LoRA on it) reading clean
    latents at one fixed timestep with a fixed text condition, and a per-pixel ``Linear(C -> 1)`` head on its
    output (a 1x1 convolution): logits ``B x 1 x h x w``."""

    def __init__(self, unet: nn.Module, lora: LoraSettings, timestep: int) -> None:
        super().__init__()
        from peft import LoraConfig

        self.unet = unet.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank,
                                         target_modules=list(lora.target_modules), init_lora_weights=lora.init))
        for p in self.unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        channels = self.unet.config.out_channels
        self.head = nn.Conv2d(channels, 1, kernel_size=1)
        self.timestep = timestep

    def forward(self, latents: torch.Tensor, condition: dict[str, Any]) -> torch.Tensor:
        """Logits of ``latents``; run it under the generator's autocast when the frozen weights are half.

        ``condition``: the UNet's conditioning keyword arguments for ``len(latents)`` rows, as
        :meth:`~t2i_align.diffusion.generator.Generator.condition_kwargs` builds them (``encoder_hidden_states``; for
        SDXL also ``added_cond_kwargs``: pooled text embedding and size/crop time ids, as CoMat's SDXL discriminator,
        CaraJ7/CoMat ``training_utils/gan_sdxl.py``, ``D_sdxl.D_sd_pipeline_forward``)."""
        t = torch.full((len(latents),), self.timestep, device=latents.device, dtype=torch.long)
        out = self.unet(latents, t, **condition)
        return self.head(out.sample.float())


def gan_losses(real_logits: torch.Tensor | None, fake_logits: torch.Tensor, for_generator: bool) -> torch.Tensor:
    """Non-saturating BCE: the generator's ``-log D(fake)``, or the discriminator's
    ``-log D(real) - log(1 - D(fake))``, each a mean over pixels and samples."""
    bce = F.binary_cross_entropy_with_logits
    if for_generator:
        return bce(fake_logits, torch.ones_like(fake_logits))
    assert real_logits is not None
    return bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))
