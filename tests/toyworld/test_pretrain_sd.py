"""ToyWorld SD pretraining at micro scale: the stages chain, resume exactly, and assemble a pipeline that
loads with diffusers and with the project's Generator."""

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from t2i_align.diffusion.generator import Generator, GeneratorConfig
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.toyworld.experts.clip_model import train_clip
from t2i_align.toyworld.pretraining.sd import (
    LATENT_CHANNELS,
    assemble_pipeline,
    export_text_encoder,
    train_unet,
    train_vae,
)


def test_stages_chain_into_a_loadable_pipeline(tmp_path):
    vae_dir = train_vae(tmp_path / "vae", steps=2, batch_size=2, log_every=1)
    clip_dir = train_clip(tmp_path / "clip", steps=1, batch_size=2, log_every=1)
    text_dir = export_text_encoder(clip_dir, tmp_path / "text")
    unet_dir = train_unet(tmp_path / "unet", vae_dir, text_dir, steps=2, batch_size=2, log_every=1)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    assert 0.1 < vae.config.scaling_factor < 100  # measured, not SD's 0.18215 default
    pipe_dir = assemble_pipeline(tmp_path / "pipeline", vae_dir, text_dir, unet_dir)
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    gen = Generator(GeneratorConfig(pretrained=str(pipe_dir)))
    with torch.no_grad():
        out = gen.sample(["a red circle"], [0], sampling=SamplingSettings(num_inference_steps=2))
    assert out.images.shape == (1, 3, 64, 64) and out.latents.shape == (1, LATENT_CHANNELS, 8, 8)
    image = pipe("a red circle", sampling=SamplingSettings(num_inference_steps=2), output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_vae_resume_is_exact(tmp_path):
    straight = train_vae(tmp_path / "a", steps=4, batch_size=2, checkpoint_every=2, log_every=2)
    train_vae(tmp_path / "b", steps=2, batch_size=2, checkpoint_every=2, log_every=2)
    resumed = train_vae(tmp_path / "b", steps=4, batch_size=2, checkpoint_every=2, log_every=2)
    a, b = AutoencoderKL.from_pretrained(straight).state_dict(), AutoencoderKL.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unet_resume_is_exact(tmp_path):
    """CFG dropout, noise and timesteps come from the checkpointed RNG; cached text contexts do not depend
    on batch composition: a resumed run ends with the same weights as a straight one."""
    from diffusers import UNet2DConditionModel

    vae_dir = train_vae(tmp_path / "vae", steps=1, batch_size=2)
    text_dir = export_text_encoder(train_clip(tmp_path / "clip", steps=1, batch_size=2), tmp_path / "text")
    kw = dict(batch_size=3, checkpoint_every=2, log_every=2)
    straight = train_unet(tmp_path / "a", vae_dir, text_dir, steps=4, **kw)
    train_unet(tmp_path / "b", vae_dir, text_dir, steps=2, **kw)
    resumed = train_unet(tmp_path / "b", vae_dir, text_dir, steps=4, **kw)
    a = UNet2DConditionModel.from_pretrained(straight).state_dict()
    b = UNet2DConditionModel.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
