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


# ------------------------------------------------------------------------------------------------------------ SDXL
#: SDXL base 1.0's scheduler_config.json (stabilityai/stable-diffusion-xl-base-1.0, scheduler/): an Euler scheduler
#: with SD's scaled-linear betas and "leading" spacing; our samplers build DDIM/DDPM from it as from SD's PNDM config.
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
    "timestep_spacing": "leading", "interpolation_type": "linear", "prediction_type": "epsilon", "use_karras_sigmas": False,
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False,
}
#: SDXL's VAE latent scale (stabilityai/stable-diffusion-xl-base-1.0, vae/config.json "scaling_factor")
SDXL_SCALING_FACTOR = 0.13025


def _sdxl_pipeline(tokenizer, text_encoder, text_encoder_2, vae, unet):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def sdxl_unet_config(tiny: bool) -> dict:
    """UNet2DConditionModel arguments of SDXL base 1.0 (unet/config.json), or of a tiny model of the same layout:
    no attention in the first down block (and the last up block), attention in transformer blocks of several
    depths (SDXL: 1, 2, 10 transformer layers by block; tiny: 1, 2 and the mid block 2), linear projections, and
    the ``text_time`` added condition (pooled text embedding + 6 size/crop ids, each embedded in
    ``addition_time_embed_dim``)."""
    if tiny:
        text_dim, pooled_dim, time_dim = 32 + 32, 32, 8
        return {
            "sample_size": TINY_RESOLUTION // 2, "in_channels": 4, "out_channels": 4,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "block_out_channels": (16, 32, 32), "layers_per_block": 1, "transformer_layers_per_block": (1, 1, 2),
            "attention_head_dim": (2, 4, 4), "cross_attention_dim": text_dim, "norm_num_groups": 8,
            "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": 6 * time_dim + pooled_dim,
        }
    return {
        "sample_size": 128, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280), "layers_per_block": 2, "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "norm_num_groups": 32, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    }


def sdxl_text_configs(tokenizer, tiny: bool):
    """CLIPTextConfig of SDXL's text_encoder (CLIP ViT-L/14) and text_encoder_2 (OpenCLIP ViT-bigG/14, with its
    1280-d projection), or of two tiny ones (32-d hidden states each, concatenated to the UNet's 64)."""
    from transformers import CLIPTextConfig

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    if tiny:
        small = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, **ids)
        return CLIPTextConfig(**small), CLIPTextConfig(**small, projection_dim=32, hidden_act="gelu")
    one = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768, **ids)
    two = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                         **ids)
    return one, two


def sdxl_vae_config(tiny: bool) -> dict:
    """AutoencoderKL arguments of SDXL's VAE (SD's architecture, ``scaling_factor`` 0.13025, ``force_upcast``: it
    overflows in float16), or of a tiny one with the same scale and flag."""
    if tiny:
        return {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 2,
                    "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (16, 32), "layers_per_block": 1,
                    "latent_channels": 4, "norm_num_groups": 8, "sample_size": TINY_RESOLUTION,
                    "scaling_factor": SDXL_SCALING_FACTOR, "force_upcast": True}
    return {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
                "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4, "sample_size": 1024,
                "scaling_factor": SDXL_SCALING_FACTOR, "force_upcast": True}


def build_sdxl_components(seed: int = 0, tiny: bool = True) -> dict:
    """Tokenizer (the tiny one, used as both tokenizers: SDXL's two share CLIP's vocabulary), both text encoders,
    VAE and UNet of an SDXL-architecture pipeline with random weights, each seeded before it is built."""
    from transformers import CLIPTextModelWithProjection

    tokenizer = CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    one, two = sdxl_text_configs(tokenizer, tiny)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(one)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(two)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**sdxl_vae_config(tiny))
    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(**sdxl_unet_config(tiny))
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "vae": vae,
            "unet": unet}


def save_tiny_sdxl_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny SDXL pipeline (~0.5M parameters, 32 px) as a diffusers folder, loadable by
    ``StableDiffusionXLPipeline.from_pretrained`` and by the generator like stabilityai/stable-diffusion-xl-base-1.0."""
    _sdxl_pipeline(**build_sdxl_components(seed, tiny=True)).save_pretrained(path)
    return Path(path)


def save_random_sdxl(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """An SDXL-base-architecture pipeline (2.6 B UNet, CLIP ViT-L + OpenCLIP bigG text encoders, SDXL VAE) with
    random weights, saved in ``dtype`` (fp16 as the hub's fp16 variant: 7 GB), for timing and memory benchmarks
    without network: it costs what the real model costs. The tokenizer is the tiny one (ids below CLIP's vocabulary
    size). Building it takes minutes on a CPU; never run by the tests (they count its parameters on the meta
    device)."""
    parts = build_sdxl_components(seed, tiny=False)
    for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
        parts[name].to(dtype)
    _sdxl_pipeline(**parts).save_pretrained(path)
    return Path(path)
