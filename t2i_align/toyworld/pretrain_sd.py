"""Pretraining of ToyWorld's Stable Diffusion parts (VAE, UNet) and assembly of the pipeline folder.

Each stage trains on scenes rendered on the fly, with every step's scenes drawn from an rng seeded by
(seed, step): a stage stopped anywhere resumes from its last checkpoint and ends with the same weights
as an uninterrupted run. The UNet learns from the NATURAL distribution only (like SD from web captions);
the VAE sees both distributions (an image codec has no reason to be biased). Evaluation prompt texts
are never trained on.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from t2i_align.io import atomic_path
from t2i_align.toyworld.splits import eval_prompt_sets
from t2i_align.toyworld.world import COMPOSITIONAL, NATURAL, Distribution, render, sample_scene

IMAGE_SIZE = 64
CFG_DROP = 0.1  # captions replaced by "" this often, so classifier-free guidance works (SD: 10 %)


def _eval_texts(seed: int) -> set[str]:
    return {s.text() for specs in eval_prompt_sets(seed, 100).values() for s in specs}


def scene_batch(seed: int, step: int, batch_size: int, dists: tuple[Distribution, ...], exclude: set[str]):
    """Images (B x 3 x 64 x 64 in [0, 1]) and captions of step ``step`` (a function of (seed, step) only)."""
    rng = random.Random(f"{seed}-{step}")
    images, captions = [], []
    while len(images) < batch_size:
        scene = sample_scene(dists[len(images) % len(dists)], rng)
        if scene.caption in exclude:
            continue
        image, _ = render(scene, IMAGE_SIZE)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
        captions.append(scene.caption)
    return torch.stack(images), captions


class StageState:
    """Atomic checkpoint of a training stage (``state.pt``) and its resume."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "state.pt"

    def load(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> int:
        if not self.path.exists():
            return 0
        state = torch.load(self.path, weights_only=True)
        for name, module in modules.items():
            module.load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
        state = {name: m.state_dict() for name, m in modules.items()}
        state.update(optimizer=optimizer.state_dict(), step=step)
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)


# ------------------------------------------------------------------------------------------------------ VAE
def build_vae(seed: int = 0) -> AutoencoderKL:
    """A 0.7 M-parameter KL autoencoder: 64 px -> 8 x 8 x 4 latents (SD's factor 8 and 4 channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def train_vae(out_dir: str | Path, steps: int = 3000, batch_size: int = 32, lr: float = 1e-3, kl_weight: float = 1e-6,
              seed: int = 0, device: str = "cpu", checkpoint_every: int = 250, log_every: int = 50) -> Path:
    """L1 reconstruction + a small KL term (as SD's VAE, without its GAN and LPIPS terms: the images are
    flat colours). Saves ``out_dir/vae`` with the latent scaling factor measured as 1 / std (SD's recipe)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae = build_vae(seed).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    state = StageState(out_dir)
    start = state.load({"vae": vae}, opt)
    exclude = _eval_texts(seed)
    t0 = time.time()
    for step in range(start, steps):
        images, _ = scene_batch(seed, step, batch_size, (NATURAL, COMPOSITIONAL), exclude)
        x = images.to(device) * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=torch.Generator(device).manual_seed(seed * 1_000_003 + step))
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0:
            print(f"vae step {step + 1}/{steps} loss {loss.item():.4f} ({(time.time() - t0) / (step + 1 - start):.2f} s/step)", flush=True)
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            state.save(step + 1, {"vae": vae}, opt)
    with torch.no_grad():
        images, _ = scene_batch(seed, -1, 256, (NATURAL, COMPOSITIONAL), exclude)
        std = vae.encode(images.to(device) * 2 - 1).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    with atomic_path(out_dir / "vae", is_dir=True) as tmp:
        vae.to("cpu").save_pretrained(tmp)
    return out_dir / "vae"


# ----------------------------------------------------------------------------------------------------- UNet
def build_unet(cross_attention_dim: int, seed: int = 0) -> UNet2DConditionModel:
    """A ~6 M-parameter SD-architecture UNet on 8 x 8 latents (cross-attention at 8 and 4)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def sd_scheduler_config() -> dict:
    """SD1.5's noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps, epsilon prediction)."""
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1, prediction_type="epsilon")


def train_unet(out_dir: str | Path, vae_dir: str | Path, clip_dir: str | Path, steps: int = 15000, batch_size: int = 64,
               lr: float = 3e-4, ema_decay: float = 0.999, seed: int = 0, device: str = "cpu",
               checkpoint_every: int = 250, log_every: int = 50) -> Path:
    """Noise-prediction training on NATURAL scenes with the frozen VAE and CLIP text tower; EMA weights saved."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(vae_dir).to(device).requires_grad_(False).eval()
    text_encoder = CLIPTextModel.from_pretrained(clip_dir).to(device).requires_grad_(False).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    unet = build_unet(text_encoder.config.hidden_size, seed).to(device)
    ema = build_unet(text_encoder.config.hidden_size, seed).to(device).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    scheduler = DDPMScheduler(**sd_scheduler_config())
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    state = StageState(out_dir)
    start = state.load({"unet": unet, "ema": ema}, opt)
    exclude = _eval_texts(seed)
    t0 = time.time()
    for step in range(start, steps):
        images, captions = scene_batch(seed, step, batch_size, (NATURAL,), exclude)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        captions = ["" if torch.rand((), generator=g) < CFG_DROP else c for c in captions]
        with torch.no_grad():
            dist = vae.encode(images.to(device) * 2 - 1).latent_dist
            latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device)) * vae.config.scaling_factor
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            context = text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g).to(device)
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - ema_decay)
        if (step + 1) % log_every == 0:
            print(f"unet step {step + 1}/{steps} loss {loss.item():.4f} ({(time.time() - t0) / (step + 1 - start):.2f} s/step)", flush=True)
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            state.save(step + 1, {"unet": unet, "ema": ema}, opt)
    with atomic_path(out_dir / "unet", is_dir=True) as tmp:
        ema.to("cpu").save_pretrained(tmp)
    return out_dir / "unet"


# ------------------------------------------------------------------------------------------------- pipeline
def export_text_encoder(clip_dir: str | Path, out_dir: str | Path) -> Path:
    """The CLIP model's text tower as a standalone ``CLIPTextModel`` folder (+ tokenizer)."""
    clip = CLIPModel.from_pretrained(clip_dir)
    text = CLIPTextModel(clip.config.text_config)
    text.text_model.load_state_dict(clip.text_model.state_dict())
    with atomic_path(out_dir, is_dir=True) as tmp:
        text.save_pretrained(tmp)
        CLIPTokenizer.from_pretrained(clip_dir).save_pretrained(tmp)
    return Path(out_dir)


def assemble_pipeline(out_dir: str | Path, vae_dir: str | Path, text_dir: str | Path, unet_dir: str | Path) -> Path:
    """Write an SD-format folder that ``StableDiffusionPipeline.from_pretrained`` loads."""
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir),
        text_encoder=CLIPTextModel.from_pretrained(text_dir),
        tokenizer=CLIPTokenizer.from_pretrained(text_dir),
        unet=UNet2DConditionModel.from_pretrained(unet_dir),
        scheduler=PNDMScheduler(**sd_scheduler_config(), skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with atomic_path(out_dir, is_dir=True) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / "toyworld.json").write_text(json.dumps({"image_size": IMAGE_SIZE}) + "\n")
    return Path(out_dir)


@torch.no_grad()
def vae_quality(vae: AutoencoderKL, count: int = 200, seed: int = 9_100_000) -> dict[str, float]:
    """Judge accuracy on VAE reconstructions of held-out renders (what the UNet can at best generate)."""
    from t2i_align.toyworld.judge import JudgeScore, ToyJudge, held_out_scenes

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
