"""SDXL as a base model: the tiny SDXL pipeline loads through the generator's path; prompt encoding, the sampler,
gradient policies, attention capture and editing run on it; its images and its exported LoRA reproduce in plain
diffusers ``StableDiffusionXLPipeline``."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline
from safetensors import safe_open

from t2i_align.diffusion.attention import (
    ScoreEdit,
    cross_attention_layer_names,
    layer_downsampling,
    self_attention_layer_names,
)
from t2i_align.diffusion.generator import (
    Generator,
    GeneratorConfig,
    LoraSettings,
    XLCondition,
    _HalvesOnTwoThreads,
)
from t2i_align.diffusion.loading import ModelLoadError
from t2i_align.diffusion.lora import LORA_WEIGHT_NAME, export_lora, load_lora
from t2i_align.diffusion.policies import ReFLPolicy, Strided
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.diffusion.tiny import SDXL_SCALING_FACTOR

PROMPTS, SEEDS = ["a red circle", "two blue squares"], [5, 6]
SAMPLING = {"num_inference_steps": 5, "guidance_scale": 7.5}
# As tests/diffusion/test_lora_export.py: both sides run the same float32 CPU operations on the same noise and
# differ at most in the order of some sums (our sampler runs LoRA merged and reuses cross-attention keys/values).
# 1e-4 on pixels in [0, 1] is 40 times below one 8-bit level; each comparison also checks that the model without
# the thing under test misses by far more (100 x), so a lost adapter or a wrong condition cannot pass.
ATOL = 1e-4


def randomise(params, scale: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def lora_generator(path: str, **kwargs) -> Generator:
    gen = Generator(GeneratorConfig(pretrained=path, lora=LoraSettings(rank=4, alpha=8), **kwargs))
    # B = 0 at init: give every adapter weights, as training would. 0.2 as test_lora_export.py: at 0.3 the tiny
    # random models (SD's too) turn chaotic under CFG 7.5 and float rounding grows to 1e-2 over 5 steps
    randomise(gen.trainable_parameters(), 0.2)
    return gen


def own_images(gen: Generator, **sampling) -> torch.Tensor:
    with torch.no_grad():
        return gen.sample(PROMPTS, SEEDS, SamplingSettings(scheduler="ddim", **{**SAMPLING, **sampling})).images


def pipeline(path: str) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # our ddim sampler, from the same config
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_images(pipe: StableDiffusionXLPipeline, **sampling) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]  # diffusers draws each sample's latents from its own
    with torch.no_grad():
        return pipe(PROMPTS, generator=gens, output_type="pt", **{**SAMPLING, **sampling}).images


# ---------------------------------------------------------------------------------------------------- the builders
def test_tiny_sdxl_is_an_sdxl_pipeline_with_several_transformer_depths(tiny_sdxl):
    index = json.loads((Path(tiny_sdxl) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    config = pipe.unet.config
    assert config.addition_embed_type == "text_time"
    assert config.projection_class_embeddings_input_dim == (
        6 * config.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim)
    assert config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    depths = {name.split(".transformer_blocks.")[1].split(".")[0]
              for name in cross_attention_layer_names(pipe.unet, ("down_blocks", "mid_block", "up_blocks"))}
    assert depths == {"0", "1"}
    assert pipe.vae.config.scaling_factor == SDXL_SCALING_FACTOR and pipe.vae.config.force_upcast


def test_random_sdxl_has_sdxl_base_sizes():
    """save_random_sdxl's parts, built on the meta device: the parameter counts of stabilityai/stable-diffusion-xl-
    base-1.0's UNet, text encoders (CLIP ViT-L/14, OpenCLIP ViT-bigG/14 with projection) and VAE."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from t2i_align.diffusion.tiny import (
        TINY_TOKENIZER_DIR,
        sdxl_text_configs,
        sdxl_unet_config,
        sdxl_vae_config,
    )

    tokenizer = CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    one, two = sdxl_text_configs(tokenizer, tiny=False)
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**sdxl_unet_config(tiny=False)), "text_encoder": CLIPTextModel(one),
                 "text_encoder_2": CLIPTextModelWithProjection(two), "vae": AutoencoderKL(**sdxl_vae_config(False))}
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    assert counts == {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                      "vae": 83_653_863}


# ------------------------------------------------------------------------------------------------- loading, text
def test_generator_loads_sdxl_and_encodes_prompts_as_diffusers(tiny_sdxl):
    gen = Generator(GeneratorConfig(pretrained=tiny_sdxl))
    assert gen.is_xl and gen.tokenizer_2 is not None and gen.text_encoder_2 is not None
    assert gen.vae.config.scaling_factor == SDXL_SCALING_FACTOR and gen.default_resolution == 32
    cond = gen.encode_prompts(PROMPTS)
    assert isinstance(cond, XLCondition) and cond.hidden.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu",
                                                                   do_classifier_free_guidance=True)
    torch.testing.assert_close(cond.hidden, embeds, atol=0, rtol=0)
    torch.testing.assert_close(cond.pooled, pooled, atol=0, rtol=0)
    empty = gen.empty_embedding()  # force_zeros_for_empty_prompt: zeros, as diffusers' negative without a prompt
    assert not negative.any() and not negative_pooled.any()
    assert not empty.hidden.any() and not empty.pooled.any() and empty.hidden.shape == (1, 77, 64)
    assert gen.encode_prompts([""]).hidden.abs().sum() > 0  # a dropped caption in training is the encoded ""

    kwargs = gen.condition_kwargs(cond, torch.zeros(2, 4, 16, 16))
    assert kwargs["encoder_hidden_states"] is cond.hidden and kwargs["added_cond_kwargs"]["text_embeds"] is cond.pooled
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2  # (orig, crop, target)
    assert gen.condition_kwargs(cond, torch.zeros(2, 4, 24, 16))["added_cond_kwargs"]["time_ids"][0].tolist() == [
        48, 32, 0, 0, 48, 32]


def test_xl_condition_behaves_like_a_batch_tensor(tiny_sdxl):
    gen = Generator(GeneratorConfig(pretrained=tiny_sdxl))
    cond = gen.encode_prompts(["a", "b", "c"])
    assert len(cond) == 3 and len(cond[1:]) == 2 and len(cond[0]) == 1 and cond.shape[0] == 3
    assert torch.equal(cond[1:].pooled, cond.pooled[1:])
    wide = gen.empty_embedding().expand_as(cond)
    assert len(wide) == 3 and wide.hidden.shape == cond.hidden.shape and len(gen.empty_embedding().expand(4, -1)) == 4
    both = XLCondition.cat([wide, cond])
    assert len(both) == 6 and torch.equal(both.hidden[3:], cond.hidden)
    with pytest.raises(ValueError, match="with and without time_ids"):
        XLCondition.cat([cond, XLCondition(cond.hidden, cond.pooled, torch.zeros(3, 6))])


def test_loading_refuses_a_refiner_and_an_incomplete_folder(tiny_sdxl, tmp_path):
    import shutil

    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_sdxl, incomplete)
    shutil.rmtree(incomplete / "text_encoder_2")
    with pytest.raises(ModelLoadError, match=r"missing subfolder\(s\) \['text_encoder_2'\]"):
        Generator(GeneratorConfig(pretrained=str(incomplete)))
    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None], tokenizer=[None, None])
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="refiner"):
        Generator(GeneratorConfig(pretrained=str(refiner)))


# ---------------------------------------------------------------------------------------------------------- VAE
def test_sdxl_vae_runs_in_float32_under_float16_unless_an_fp16_fixed_vae_is_given(tiny_sdxl, tmp_path):
    half = Generator(GeneratorConfig(pretrained=tiny_sdxl, weight_dtype="float16", lora=None))
    assert half.vae_upcast and half.vae.dtype == torch.float32 and half.text_encoder.dtype == torch.float16
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.float16):  # an outer autocast (a precision plugin) does not reach it
        images = half.decode_latents(latents)
    reference = Generator(GeneratorConfig(pretrained=tiny_sdxl, lora=None)).decode_latents(latents)
    torch.testing.assert_close(images, reference, atol=0, rtol=0)  # the same float32 decode

    # an fp16-fixed VAE (force_upcast false, as madebyollin/sdxl-vae-fp16-fix) from its own folder runs in float16
    fixed = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    fixed.register_to_config(force_upcast=False)
    fixed.save_pretrained(tmp_path / "vae-fp16-fix")
    gen = Generator(GeneratorConfig(pretrained=tiny_sdxl, weight_dtype="float16", lora=None,
                                    vae=str(tmp_path / "vae-fp16-fix")))
    assert not gen.vae_upcast and gen.vae.dtype == torch.float16 and not gen.vae.config.force_upcast
    bf16 = Generator(GeneratorConfig(pretrained=tiny_sdxl, weight_dtype="bfloat16", lora=None))
    assert not bf16.vae_upcast and bf16.vae.dtype == torch.bfloat16  # diffusers upcasts float16 only


def test_latents_round_trip_with_sdxl_scaling(tiny_sdxl):
    gen = Generator(GeneratorConfig(pretrained=tiny_sdxl, lora=None))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    latents = gen.encode_images(pixels, torch.Generator().manual_seed(1))
    with torch.no_grad():
        dist = gen.vae.encode(pixels * 2 - 1).latent_dist
        expected = dist.sample(torch.Generator().manual_seed(1)) * SDXL_SCALING_FACTOR
        decoded = (gen.vae.decode(latents / SDXL_SCALING_FACTOR).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(gen.decode_latents(latents), decoded, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- sampling vs diffusers
@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_the_sampler_reproduces_diffusers_sdxl_pipeline(tiny_sdxl, guidance):
    gen = Generator(GeneratorConfig(pretrained=tiny_sdxl, lora=None))
    randomise(gen.unet.parameters(), 0.0)  # untouched: the pipeline's own weights
    ours = own_images(gen, guidance_scale=guidance)
    theirs = pipeline_images(pipeline(tiny_sdxl), guidance_scale=guidance)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    # the added condition matters far beyond the tolerance: other time ids draw other images
    cond = gen.encode_prompts(PROMPTS)
    other = XLCondition(cond.hidden, cond.pooled, time_ids=torch.tensor([[64.0, 64, 8, 8, 32, 32]] * 2))
    with torch.no_grad():
        moved = gen.sample(PROMPTS, SEEDS, SamplingSettings(scheduler="ddim", **{**SAMPLING, "guidance_scale": 1.0}),
                           embeddings=other).images
    assert (moved - own_images(gen, guidance_scale=1.0)).abs().max() > 100 * ATOL


def test_fast_sampling_matches_the_reference_path_on_sdxl(tiny_sdxl, monkeypatch):
    import contextlib

    from t2i_align.diffusion import generator as generator_module

    caches, original = [], generator_module.key_value_cache

    @contextlib.contextmanager
    def spy(unet):
        with original(unet) as cache:
            caches.append(cache)
            yield cache

    monkeypatch.setattr(generator_module, "key_value_cache", spy)
    gen = lora_generator(tiny_sdxl)
    fast = own_images(gen)
    # the XLCondition's hidden states are one tensor through the chain: every cross-attention layer (11, both
    # depths) reuses its keys and values at the 4 steps after the first
    assert len(caches) == 1 and caches[0].hits == 4 * 11
    gen.fast_sampling = False  # peft wrappers and SDPA at every step, no key/value cache
    torch.testing.assert_close(own_images(gen), fast, atol=1e-5, rtol=0)


def test_two_thread_halves_take_an_xl_condition(tiny_sdxl):
    gen = lora_generator(tiny_sdxl)
    cond = XLCondition.cat([gen.empty_embedding().expand(4, -1, -1), gen.encode_prompts(["a", "b", "c", "d"])])
    x = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with torch.no_grad():
        whole = gen.unet_forward(x, t, cond)
        halves = _HalvesOnTwoThreads()(lambda xh, ch: gen.unet_forward(xh, t, ch), x, cond)
    torch.testing.assert_close(halves, whole, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------------- LoRA export
def test_lora_export_reloads_in_diffusers_sdxl_and_reproduces_the_images(tiny_sdxl, tmp_path):
    gen = lora_generator(tiny_sdxl)
    path = export_lora(gen, tmp_path / "lora")
    ours = own_images(gen)
    pipe = pipeline(tiny_sdxl)
    base = pipeline_images(pipe)
    pipe.load_lora_weights(str(path.parent), weight_name=LORA_WEIGHT_NAME)  # StableDiffusionXLLoraLoaderMixin
    theirs = pipeline_images(pipe)

    adapted = {name for name, m in gen.unet.named_modules() if getattr(m, "lora_A", None)}
    assert adapted == {name for name, m in pipe.unet.named_modules() if getattr(m, "lora_A", None)}
    assert any(".transformer_blocks.1." in name for name in adapted)  # the deeper transformer layers too
    assert (base - ours).abs().max() > 100 * ATOL
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in f.keys())  # noqa: SIM118

    plain = Generator(GeneratorConfig(pretrained=tiny_sdxl, lora=None))  # and back into our generator
    load_lora(plain.unet, path.parent)
    torch.testing.assert_close(own_images(plain), ours, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------- attention, every depth
def test_capture_finds_every_cross_attention_of_every_depth_at_batch_2(tiny_sdxl):
    gen = lora_generator(tiny_sdxl)
    every = cross_attention_layer_names(gen.unet, ("down_blocks", "mid_block", "up_blocks"))
    attn2 = [name for name, _ in gen.unet.named_modules() if name.endswith(".attn2")]
    assert sorted(every) == sorted(attn2) and len(every) == 11
    assert {n.split(".transformer_blocks.")[1].split(".")[0] for n in every} == {"0", "1"}
    assert cross_attention_layer_names(gen.unet) == [n for n in every if not n.startswith("down_blocks")]
    assert len(self_attention_layer_names(gen.unet, ("down_blocks", "mid_block", "up_blocks"))) == len(every)

    gen.enable_attention_capture(every)
    with torch.no_grad():
        out = gen.sample(PROMPTS, SEEDS, SamplingSettings(num_inference_steps=3, guidance_scale=5.0),
                         record_attention=[1])
    maps = out.attention.layers(1)
    assert set(maps) == set(every)
    for name, m in maps.items():
        side = 16 // layer_downsampling(gen.unet, name)  # 16 x 16 latents at 32 px
        assert m.shape == (2, side, side, 77), name  # the conditional half of CFG, batch 2
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), atol=1e-5, rtol=0)
    assert sorted(out.attention.by_resolution(1)) == [4, 8]
    assert {layer_downsampling(gen.unet, n) for n in every} == {2, 4}
    assert cross_attention_layer_names(gen.unet, ("up_blocks",), downsampling=[2]) == [
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
    with pytest.raises(ValueError, match=r"at downsampling \[1\]"):
        cross_attention_layer_names(gen.unet, downsampling=[1])


def test_attention_edits_reach_every_depth(tiny_sdxl):
    gen = lora_generator(tiny_sdxl)
    settings = SamplingSettings(num_inference_steps=3, guidance_scale=5.0)
    layers = cross_attention_layer_names(gen.unet)
    deep = [n for n in layers if ".transformer_blocks.1." in n]
    seen: set[str] = set()

    def identity(scores, ctx):
        seen.add(ctx.layer)
        return scores

    def boost(scores, ctx):
        scores[..., 1] += 5.0
        return scores

    with torch.no_grad():
        plain = gen.sample(PROMPTS, SEEDS, settings).images
        same = gen.sample(PROMPTS, SEEDS, settings, attention_edits=[ScoreEdit(identity, layers)]).images
        edited = gen.sample(PROMPTS, SEEDS, settings, attention_edits=[ScoreEdit(boost, deep)]).images
    assert seen == set(layers)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    assert (edited - plain).abs().max() > 1e-3  # the second transformer layers alone change the images


# ------------------------------------------------------------------------------------- training paths (gradients)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_gradient_policies_and_denoising_loss_train_the_sdxl_lora(tiny_sdxl, checkpointing):
    gen = lora_generator(tiny_sdxl, gradient_checkpointing=checkpointing)
    params = gen.trainable_parameters()
    settings = SamplingSettings(num_inference_steps=4, guidance_scale=5.0)

    def grads(loss):
        gen.zero_grad()
        loss.backward()
        return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)

    refl = gen.sample(PROMPTS, SEEDS, settings, policy=ReFLPolicy(1, 3), policy_rng=torch.Generator().manual_seed(0))
    assert grads(refl.images.mean()) > 0
    strided = gen.sample(PROMPTS, SEEDS, settings, policy=Strided(2, 2), record_attention=True,
                         policy_rng=torch.Generator().manual_seed(0))
    assert strided.attention.steps == list(strided.plan_grad_steps)
    assert grads(strided.images.mean() + sum(m.mean() for m in strided.attention.layers().values())) > 0
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = gen.denoising_forward(pixels, PROMPTS, torch.Generator().manual_seed(0), record_attention=True)
    assert set(out.attention.layers(0)) == set(cross_attention_layer_names(gen.unet))
    assert torch.isfinite(out.loss) and grads(out.loss) > 0
    again = gen.denoising_forward(pixels, PROMPTS, torch.Generator().manual_seed(0), record_attention=True).loss
    assert float(again) == float(out.loss)  # reproducible from its seed


def test_base_model_view_samples_the_sdxl_base_without_the_lora(tiny_sdxl):
    gen = lora_generator(tiny_sdxl)
    base = gen.base_model()  # CoMat's frozen model on a second thread: the condition is an XLCondition there too
    with torch.no_grad():
        ours = base.sample(PROMPTS, SEEDS, SamplingSettings(**SAMPLING), embeddings=gen.encode_prompts(PROMPTS)).images
        gen.unet.disable_adapters()
        try:
            expected = gen.sample(PROMPTS, SEEDS, SamplingSettings(**SAMPLING)).images
        finally:
            gen.unet.enable_adapters()
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert (own_images(gen) - expected).abs().max() > 100 * ATOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_weights_sample_and_train_on_sdxl(tiny_sdxl, dtype):
    """Frozen weights in half precision (the text encoders' pooled and hidden states reach the UNet in that dtype,
    the float32 time ids beside them) under autocast; float16 decodes with SDXL's VAE in float32."""
    gen = lora_generator(tiny_sdxl, weight_dtype=dtype, gradient_checkpointing=True)
    assert gen.text_encoder_2.dtype == getattr(torch, dtype)
    assert gen.vae.dtype == (torch.float32 if dtype == "float16" else torch.bfloat16)
    out = gen.sample(PROMPTS, SEEDS, SamplingSettings(num_inference_steps=4, guidance_scale=5.0),
                     policy=ReFLPolicy(1, 3), policy_rng=torch.Generator().manual_seed(0))
    loss = out.images.mean() + gen.denoising_loss(torch.rand(2, 3, 32, 32), PROMPTS, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(out.images).all() and out.images.dtype == torch.float32
    assert all(p.grad is not None and p.dtype == torch.float32 for p in gen.trainable_parameters())
    # the base model in half precision stays near its float32 images (mean over pixels; the randomised LoRA above is
    # too chaotic under CFG to compare precisions): 2e-4 (float16) and 2e-3 (bfloat16) measured, SD's alike
    settings = SamplingSettings(num_inference_steps=4, guidance_scale=5.0)
    with torch.no_grad():
        full = Generator(GeneratorConfig(pretrained=tiny_sdxl, lora=None)).sample(PROMPTS, SEEDS, settings).images
        half = Generator(GeneratorConfig(pretrained=tiny_sdxl, lora=None, weight_dtype=dtype)).sample(
            PROMPTS, SEEDS, settings).images
    assert 0 < (half - full).abs().mean() < (1e-3 if dtype == "float16" else 1e-2)
