"""Pretraining of ToyWorld's Stable Diffusion parts (VAE, UNet) and assembly of the pipeline folder.

Each stage trains with :func:`t2i_align.toyworld.pretraining.batches.train_loop` on scenes rendered on the fly (a
function of (stream, seed, step)): a stage stopped anywhere resumes from its last checkpoint and ends
with the same weights as an uninterrupted run. The UNet learns from the NATURAL distribution only (like SD from web captions);
the VAE sees both distributions (an image codec has no reason to be biased). Evaluation prompt texts
are never trained on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from t2i_align.io import atomic_path
from t2i_align.toyworld.pretraining.batches import LoopConfig, heldout_scenes, render_batch, to_float, train_loop
from t2i_align.toyworld.world import render

IMAGE_SIZE = 64
LATENT_CHANNELS = 8
CFG_DROP = 0.1  # captions replaced by "" this often, so classifier-free guidance works (SD: 10 %)


# ------------------------------------------------------------------------------------------------------ VAE
def build_vae(seed: int = 0) -> AutoencoderKL:
    """A 0.7 M-parameter KL autoencoder: 64 px -> 8 x 8 x 8 latents (SD's factor 8).

    8 latent channels rather than SD's 4: with 4, 1000 steps reconstructed shape and colour for ~88 % of
    objects but stripes for ~63 % (blurred away); an 8 x 8 cell of flat colours, an edge and 3-px stripes
    needs more than 4 numbers from so small a decoder. The UNet's cost does not change."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, seed: int = 0) -> float:
    """1 / std of the latents of held-out renders (SD's recipe for ``scaling_factor``)."""
    images = to_float(render_batch(heldout_scenes("mix", seed, 256), IMAGE_SIZE)).to(vae.device)
    return 1.0 / vae.encode(images * 2 - 1).latent_dist.mean.std().item()


def train_vae(out_dir: str | Path, steps: int = 3000, batch_size: int = 32, lr: float = 1e-3, kl_weight: float = 1e-6,
              seed: int = 0, device: str = "cpu", num_workers: int = 0, checkpoint_every: int = 250,
              log_every: int = 50) -> Path:
    """L1 reconstruction + a small KL term (SD's VAE objective without its GAN and LPIPS terms: the images
    are flat colours) on natural + compositional renders. Returns ``out_dir/model``."""

    def loss_fn(vae, images, captions):
        x = to_float(images) * 2 - 1
        posterior = vae.encode(x).latent_dist
        return F.l1_loss(vae.decode(posterior.sample()).sample, x) + kl_weight * posterior.kl().mean()

    def save_final(vae, path):
        vae.eval()
        vae.register_to_config(scaling_factor=latent_scale(vae, seed))
        vae.to("cpu").save_pretrained(path)

    # cosine decay to 0 at ``steps``: the last steps at a small learning rate sharpen edges and stripes
    cfg = LoopConfig(steps, batch_size, lr, seed, warmup=100, schedule="cosine", weight_decay=0.0, grad_clip=0.0,
                     device=device, num_workers=num_workers, checkpoint_every=checkpoint_every, log_every=log_every)
    return train_loop(out_dir, build_vae(seed), loss_fn, save_final, "vae", cfg)


# ----------------------------------------------------------------------------------------------------- UNet
def build_unet(cross_attention_dim: int, seed: int = 0) -> UNet2DConditionModel:
    """A ~6 M-parameter SD-architecture UNet on 8 x 8 latents (cross-attention at 8 and 4)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def sd_scheduler_config() -> dict:
    """SD1.5's noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps, epsilon prediction).

    ``clip_sample=False`` as in SD1.5's scheduler_config.json: DDIM and DDPM default to clipping the x0
    prediction to [-1, 1], which latents (std 1, some channels wider) do not respect; with clipping, samples
    lose their colours."""
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1, prediction_type="epsilon", clip_sample=False)


class UNetWithEMA(torch.nn.Module):
    """The trained UNet and its exponential moving average (checkpointed together; the EMA is exported)."""

    def __init__(self, unet: UNet2DConditionModel, ema: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet, self.ema = unet, ema.requires_grad_(False)
        self.ema.load_state_dict(unet.state_dict())


def train_unet(out_dir: str | Path, vae_dir: str | Path, text_dir: str | Path, steps: int = 12000, batch_size: int = 64,
               lr: float = 3e-4, ema_decay: float = 0.999, seed: int = 0, device: str = "cpu", num_workers: int = 0,
               checkpoint_every: int = 250, log_every: int = 50, schedule: str = "hold_cosine",
               decay_start: int | None = None) -> Path:
    """Noise-prediction training on NATURAL scenes only (the biased "web" distribution) with the frozen VAE
    and CLIP text tower; 10 % empty captions for CFG. Returns ``out_dir/model`` (the EMA weights).

    The learning rate is constant for the first two thirds (``decay_start``), then cosine to 0."""
    vae = AutoencoderKL.from_pretrained(vae_dir).to(device).requires_grad_(False).eval()
    text_encoder = CLIPTextModel.from_pretrained(text_dir).to(device).requires_grad_(False).eval()
    tokenizer = CLIPTokenizer.from_pretrained(text_dir)
    scheduler = DDPMScheduler(**sd_scheduler_config())
    dim = text_encoder.config.hidden_size

    contexts: dict[str, torch.Tensor] = {}  # natural captions repeat: ~40 % of a step was the text encoder

    @torch.no_grad()
    def encode_text(caption: str) -> torch.Tensor:
        # one caption per call, so a cached value never depends on the batch it first appeared in
        if caption not in contexts:
            ids = tokenizer([caption], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            contexts[caption] = text_encoder(ids)[0][0]
        return contexts[caption]

    def loss_fn(model, images, captions):
        # all randomness from torch's global generator, which train_loop checkpoints: exact resume
        drop = torch.rand(len(captions)) < CFG_DROP
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            latents = vae.encode(to_float(images) * 2 - 1).latent_dist.sample() * vae.config.scaling_factor
            context = torch.stack([encode_text(c) for c in captions])
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(captions),), device=latents.device)
        pred = model.unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
        return F.mse_loss(pred, noise)

    @torch.no_grad()
    def update_ema(model):
        for e, p in zip(model.ema.parameters(), model.unet.parameters()):
            e.lerp_(p, 1 - ema_decay)

    def save_final(model, path):
        model.ema.to("cpu").save_pretrained(path)

    cfg = LoopConfig(steps, batch_size, lr, seed, warmup=200, schedule=schedule,
                     decay_start=2 * steps // 3 if decay_start is None else decay_start, weight_decay=1e-2,
                     device=device, num_workers=num_workers, checkpoint_every=checkpoint_every, log_every=log_every,
                     natural_share=1.0)
    model = UNetWithEMA(build_unet(dim, seed), build_unet(dim, seed))
    return train_loop(out_dir, model, loss_fn, save_final, "unet", cfg, after_step=update_ema)


# ------------------------------------------------------------------------------------------------- pipeline
def export_text_encoder(clip_dir: str | Path, out_dir: str | Path) -> Path:
    """The CLIP model's text tower as a standalone ``CLIPTextModel`` folder (+ tokenizer): transformers maps
    the text weights of a ``CLIPModel`` checkpoint into ``CLIPTextModel`` and ignores the vision tower."""
    text = CLIPTextModel.from_pretrained(clip_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        text.save_pretrained(tmp)
        CLIPTokenizer.from_pretrained(clip_dir).save_pretrained(tmp)
    return Path(out_dir)


def assemble_pipeline(out_dir: str | Path, vae_dir: str | Path, text_dir: str | Path, unet_dir: str | Path,
                      half: bool = True) -> Path:
    """Write an SD-format folder that ``StableDiffusionPipeline.from_pretrained`` loads.

    ``half`` stores the UNet and VAE weights in float16 (the committed models must fit in 30 MB); diffusers
    loads them back as float32 unless asked otherwise. The text encoder stays float32: transformers 5 loads
    a checkpoint in its stored dtype by default, and a float16 text encoder would not match a float32 UNet."""
    weights = torch.float16 if half else torch.float32
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir).to(weights),
        text_encoder=CLIPTextModel.from_pretrained(text_dir, dtype=torch.float32),
        tokenizer=CLIPTokenizer.from_pretrained(text_dir),
        unet=UNet2DConditionModel.from_pretrained(unet_dir).to(weights),
        # from_config keeps clip_sample in the saved config (PNDM itself has no such argument), as SD1.5's does
        scheduler=PNDMScheduler.from_config({**sd_scheduler_config(), "skip_prk_steps": True, "set_alpha_to_one": False}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with atomic_path(out_dir, is_dir=True) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / "toyworld.json").write_text(json.dumps({"image_size": IMAGE_SIZE}) + "\n")
    return Path(out_dir)


def save_half(model_dir: str | Path, out_dir: str | Path, model_class: type) -> Path:
    """Copy a transformers model folder with its weights in float16 (tokenizer / processor files as they are).
    Load it back with ``dtype=torch.float32``: transformers 5 otherwise keeps the stored dtype."""
    model_dir = Path(model_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        model_class.from_pretrained(model_dir, dtype=torch.float16).save_pretrained(tmp)
    return Path(out_dir)


@torch.no_grad()
def vae_quality(vae: AutoencoderKL, count: int = 200, seed: int = 9_100_000) -> dict[str, float]:
    """Judge accuracy on VAE reconstructions of held-out renders (what the UNet can at best generate)."""
    from t2i_align.toyworld.experts.judge import JudgeScore, ToyJudge, held_out_scenes

    judge, score = ToyJudge(), JudgeScore()
    scenes = held_out_scenes(count, seed)
    errors = []
    for start in range(0, count, 32):
        chunk = scenes[start:start + 32]
        x = torch.stack([torch.from_numpy(np.asarray(render(s, IMAGE_SIZE)[0]).copy()).permute(2, 0, 1).float() / 255 for s in chunk])
        rec = (vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
        errors.append((rec - x).abs().mean().item())
        for image, scene in zip(rec, chunk):
            score.update(judge.detect(image), scene.objects)
    out = {"object_accuracy": score.accuracy, "l1": float(np.mean(errors))}
    out.update({f"{name}_accuracy": score.attribute_accuracy(name) for name in ("shape", "colour", "size", "texture")})
    return out
