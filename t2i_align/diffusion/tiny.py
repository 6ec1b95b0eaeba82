"""A tiny Stable Diffusion pipeline with random weights, for tests and the CPU demo.

The parts are SD-architecture diffusers/transformers models built from small configs (each seeded
before it is built, as in diffusers' pipeline tests). :func:`save_tiny_pipeline` writes an ordinary
diffusers folder, which then loads through the same code path as a real SD1.5 folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from t2i_align.diffusion.assets import TINY_TOKENIZER_DIR

TINY_RESOLUTION = 32  # pixels; the VAE halves it once, so latents are 16 x 16


def build_tiny_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Tokenizer, text encoder, VAE, UNet and scheduler of a ~1M-parameter SD-style pipeline."""
    tokenizer = CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    # The scheduler config of SD1.5 (a PNDM scheduler with these settings), so samplers derive alike.
    # clip_sample=False is in SD1.5's scheduler_config.json (PNDM ignores it; DDIM/DDPM built from this config
    # would otherwise clip latents to [-1, 1]); from_config keeps it in the saved config
    scheduler = PNDMScheduler.from_config(dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        clip_sample=False,
    ))
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def save_tiny_pipeline(path: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny pipeline as a diffusers folder (loadable by ``StableDiffusionPipeline.from_pretrained``)."""
    pipe = StableDiffusionPipeline(
        **build_tiny_components(seed, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return Path(path)


def save_random_sd15(path: str | Path, seed: int = 0) -> Path:
    """An SD1.5-architecture pipeline (860 M UNet, CLIP ViT-L/14 text tower, SD VAE) with random weights, for
    timing and memory benchmarks without network: it costs exactly what the real model costs. The tokenizer is
    the tiny one (token ids stay below SD's vocabulary size)."""
    tokenizer = CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD1.5's config
    components = build_tiny_components(seed)
    pipe = StableDiffusionPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=components["scheduler"],
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return Path(path)
