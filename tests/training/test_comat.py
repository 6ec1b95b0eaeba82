"""CoMat on tiny models: where L_i2t's gradient enters, the discriminator's real latents, mixed latents'
starting step, attention recorded at r of the K grad steps, and one full training step (G and D both change,
D learns from detached fakes), on SD and on SDXL (the discriminator's SDXL conditioning, the captioner's [0, 1]
images, the real latents' recipe). The CLI, resume, export and DDP are the contract test's
(tests/training/test_method_contract.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from t2i_align.diffusion import attention_losses as al
from t2i_align.diffusion.generator import Generator, GeneratorConfig, LoraSettings
from t2i_align.diffusion.policies import Fixed, StepPlan
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.experts.captioner import BlipLikelihood
from t2i_align.lightning_modules.comat import CoMat
from tests.helpers import HalfSegmenter, save_tiny_captioner, trainable_digest

PROMPTS = ["a red circle", "a blue square and a green star"]
SEEDS = [3, 4]


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> BlipLikelihood:
    return BlipLikelihood(save_tiny_captioner(tmp_path_factory.mktemp("captioner")), prefix="", max_shift=0)


def make(tiny_sd: str, captioner, steps: int = 6, **kwargs) -> CoMat:
    """CoMat with the paper's sampler (DDPM, CFG 7.5) over ``steps`` steps."""
    sampling = SamplingSettings(steps, guidance_scale=7.5, scheduler="ddpm")
    settings = dict(sampling=sampling, num_grad_steps=2, grad_stride=3, adversarial_weight=0.0)
    settings.update(kwargs)
    torch.manual_seed(0)
    return CoMat(generator=GeneratorConfig(tiny_sd), captioner=captioner, **settings)


class UNetCalls:
    """Records, per UNet call, its timestep, whether it ran with gradient, and its input latents."""

    def __init__(self, generator: Generator) -> None:
        self.calls: list[tuple[int, bool, torch.Tensor]] = []
        original = generator.unet_forward

        def forward(latents, timesteps, embeddings, use_checkpoint=False):
            t = int(timesteps if timesteps.ndim == 0 else timesteps.flatten()[0])
            self.calls.append((t, torch.is_grad_enabled(), latents.detach().clone()))
            return original(latents, timesteps, embeddings, use_checkpoint)

        generator.unet_forward = forward


def test_i2t_gradient_reaches_the_lora_only_through_the_grad_steps(tiny_sd, captioner):
    module = make(tiny_sd, captioner)
    calls = UNetCalls(module.generator)
    rng = torch.Generator().manual_seed(0)
    out = module.generate(PROMPTS, SEEDS, rng)
    timesteps = module.generator.make_scheduler(module.sampling).timesteps.tolist()
    grad_calls = [timesteps.index(t) for t, grad, _ in calls.calls if grad]
    assert grad_calls == list(out.plan_grad_steps) and len(grad_calls) == 2
    assert out.plan_grad_steps[1] - out.plan_grad_steps[0] == 3  # the stride
    loss = -captioner.log_likelihood(out.images, PROMPTS).mean()
    loss.backward()
    lora = [p for p in module.generator_trainable().values()]
    assert sum(float(p.grad.abs().sum()) for p in lora if p.grad is not None) > 0

    # without grad steps nothing in the chain carries gradient
    plain = module.generator.sample(PROMPTS, SEEDS, policy=Fixed(StepPlan(frozenset())), sampling=module.sampling)
    assert not plain.images.requires_grad


def test_attention_is_recorded_at_r_of_the_k_grad_steps_and_feeds_eq_4_5(tiny_sd, captioner):
    module = make(tiny_sd, captioner, steps=8, num_grad_steps=3, grad_stride=2, concentration_steps=2,
                  segmenter=HalfSegmenter())
    out = module.generate(PROMPTS, SEEDS, torch.Generator().manual_seed(1))
    recorded = sorted({step for step, _ in out.attention.maps})
    assert len(recorded) == 2 and set(recorded) <= set(out.plan_grad_steps)
    assert all(m.requires_grad for m in out.attention.maps.values())
    l_pos, l_neg = module.concentration_losses(out, PROMPTS)
    # by hand: every map, the prompts' entities with the segmenter's masks (the second noun of each prompt missing)
    masks = HalfSegmenter().masks(out.images, [[e.noun for e in module.entities(p)] for p in PROMPTS])
    groups = [[al.Grounding(e.positions, m) for e, m in zip(module.entities(p), pm)] for p, pm in zip(PROMPTS, masks)]
    assert [len(g) for g in groups] == [1, 2]  # circle; square and star
    values = [al.comat_concentration(maps, groups) for maps in out.attention.maps.values()]
    torch.testing.assert_close(l_pos, torch.stack([v[0].mean() for v in values]).mean())
    torch.testing.assert_close(l_neg, torch.stack([v[1].mean() for v in values]).mean())
    (l_pos + l_neg).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.generator_trainable().values())


def test_real_latents_are_the_frozen_models(tiny_sd, captioner):
    module = make(tiny_sd, captioner, adversarial_weight=1.0, discriminator_lora=LoraSettings(rank=2))
    with torch.no_grad():  # an online model that differs from the base
        for name, p in module.generator_trainable().items():
            if "lora_B" in name:
                p.normal_(std=0.5)
        online_before = module.generator.sample(PROMPTS, SEEDS, decode=False, sampling=module.sampling).latents
        real = module.real_latents(PROMPTS, SEEDS)
        online_after = module.generator.sample(PROMPTS, SEEDS, decode=False, sampling=module.sampling).latents
        base = Generator(GeneratorConfig(tiny_sd, lora=None)).sample(PROMPTS, SEEDS, decode=False, sampling=module.sampling)
    torch.testing.assert_close(real, base.latents, atol=1e-5, rtol=0)
    assert (online_before - real).abs().max() > 1e-3
    torch.testing.assert_close(online_after, online_before, atol=0, rtol=0)  # adapters are back on
    # the discriminator reads latents with a per-pixel head: one logit per latent pixel
    logits = module.discriminate(real)
    assert logits.shape == (2, 1, *real.shape[-2:])


def test_mixed_latents_start_at_the_first_step_below_tau(tiny_sd, captioner, tiny_pairs):
    from t2i_align.datamodules.pairs import PairDataset, PairSource, collate_pairs

    module = make(tiny_sd, captioner, steps=10, mix_ratio=0.5, mix_t1=450, mix_t2=450)
    calls = UNetCalls(module.generator)
    pairs = collate_pairs([PairDataset.from_source(PairSource(tiny_pairs), 32, 0)[i] for i in range(4)])
    images, captions, start = module.mixed_latents(pairs, torch.Generator().manual_seed(0))
    timesteps = module.generator.make_scheduler(module.sampling).timesteps.tolist()  # 901, 801, ..., 1
    assert timesteps[start] <= 450 < timesteps[start - 1]
    assert [t for t, _, _ in calls.calls] == timesteps[start:]  # the chain runs from there to the end
    assert len(captions) == 2 and captions == list(pairs["captions"][:2]) and images.shape[0] == 2
    assert sum(grad for _, grad, _ in calls.calls) >= 1 and images.requires_grad


def test_sampling_from_init_latents_noises_them_to_the_start_step(tiny_sd):
    generator = Generator(GeneratorConfig(tiny_sd))
    calls = UNetCalls(generator)
    clean = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        generator.sample(PROMPTS, SEEDS, SamplingSettings(10, guidance_scale=1.0, scheduler="ddpm"),
                         init_latents=clean, start_step=6)
    scheduler = generator.make_scheduler(SamplingSettings(10, scheduler="ddpm"))
    t = scheduler.timesteps[6]
    noise = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    assert calls.calls[0][0] == int(t) and len(calls.calls) == 4
    torch.testing.assert_close(calls.calls[0][2], scheduler.add_noise(clean, noise, t.repeat(2)))
    with pytest.raises(ValueError, match="needs init_latents"):
        generator.sample(PROMPTS, SEEDS, SamplingSettings(10), start_step=3)


def test_one_step_updates_g_and_d_and_d_learns_from_detached_fakes(tiny_sd, captioner, tiny_pairs, tmp_path,
                                                                  monkeypatch):
    from t2i_align.datamodules import T2IDataModule
    from t2i_align.datamodules.pairs import PairSource
    from t2i_align.datamodules.prompts import PromptSource

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    module = make(tiny_sd, captioner, adversarial_weight=1.0, discriminator_lora=LoraSettings(rank=2),
                  mix_ratio=0.5, segmenter=HalfSegmenter())
    data = T2IDataModule(train_prompts=[PromptSource(str(tmp_path / "prompts.txt"))],
                         train_pairs=PairSource(tiny_pairs), batch_size=2, resolution=32)
    generator_params = list(module.generator_trainable().values())
    seen, fed = [], []
    original_step, original_forward = module.manual_step, module.discriminator.forward

    def spy_step(loss, optimizer, **kwargs):
        reach = [None]
        if kwargs.get("count_step", True):  # the generator's step: its loss reaches its weights
            reach = torch.autograd.grad(loss, generator_params, allow_unused=True, retain_graph=True)
        seen.append({"count_step": kwargs.get("count_step", True), "reaches_generator": any(g is not None for g in reach)})
        return original_step(loss, optimizer, **kwargs)

    def spy_forward(latents, condition):
        fed.append(latents.requires_grad)
        return original_forward(latents, condition)

    monkeypatch.setattr(module, "manual_step", spy_step)
    monkeypatch.setattr(module.discriminator, "forward", spy_forward)
    digests = {"g": trainable_digest(module.generator), "d": trainable_digest(module.discriminator)}
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1  # the discriminator's update is not counted
    assert seen == [{"count_step": True, "reaches_generator": True}, {"count_step": False, "reaches_generator": False}]
    # G's adversarial term through D (run again in each backward through it: activation checkpointing; the spy's
    # autograd.grad is one), then D on real and on detached fakes
    assert fed == [True, True, True, False, False]
    assert trainable_digest(module.generator) != digests["g"]
    assert trainable_digest(module.discriminator) != digests["d"]
    logged = set(trainer.callback_metrics)
    assert {"train/i2t_loss", "train/adv_loss", "train/d_loss", "train/pos_loss", "train/neg_loss"} <= logged


def lora_gradient(module: CoMat, out) -> list[torch.Tensor]:
    params = list(module.generator_trainable().values())
    return list(torch.autograd.grad(out.images.square().mean(), params))


def test_detach_input_cuts_the_gradient_into_earlier_grad_steps(tiny_sd, captioner):
    # detach_input=True (the paper's Algorithm 1): a grad step's UNet input is detached, so its gradient does not flow
    # through the UNet into the earlier grad steps; the LoRA gradient is then the sum of each grad step's gradient
    # alone (only its own UNet call in the graph). False (CoMat's SD1.5 code) keeps that path: the sum falls short.
    gap = {}
    for detach in (False, True):
        module = make(tiny_sd, captioner, steps=6, num_grad_steps=2, grad_stride=1, detach_input=detach)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in module.generator_trainable().values():  # a LoRA that changes the output (B = 0 at init)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        out = module.generate(PROMPTS, SEEDS, torch.Generator().manual_seed(0))
        assert len(out.plan_grad_steps) == 2
        alone = [lora_gradient(module, module.generator.sample(
            PROMPTS, SEEDS, module.sampling, policy=Fixed(StepPlan(frozenset({s}), detach_input=True))))
            for s in out.plan_grad_steps]
        total, parts = lora_gradient(module, out), [sum(ps) for ps in zip(*alone)]
        gap[detach] = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(total, parts) if b.any())
    assert gap[True] < 1e-4 and gap[False] > 0.05  # float rounding (merged LoRA on no-grad steps) vs a real term


@pytest.mark.parametrize("config", ["method/comat.yaml", "experiment/toyworld_comat.yaml"])
def test_configs_state_detach_input(config):
    import yaml

    from tests.helpers import REPO_ROOT

    text = (Path(REPO_ROOT) / "configs" / config).read_text()
    assert yaml.safe_load(text)["model"]["init_args"]["detach_input"] is False  # the public SD1.5 code's choice


def test_comat_sdxl_config_has_the_papers_sdxl_settings():
    import yaml

    from tests.helpers import REPO_ROOT

    config = yaml.safe_load((Path(REPO_ROOT) / "configs/experiment/comat_sdxl.yaml").read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["detach_input"] is True  # CoMat's SDXL code
    assert model["adversarial_weight"] == 0.5 and model["optimizer"]["init_args"]["lr"] == 2e-5  # Table 8, SDXL
    assert data["batch_size"] == 6 and round(model["mix_ratio"] * data["batch_size"]) == 2  # batch 6, GT batch 2
    assert model["generator"]["lora"]["rank"] == model["discriminator_lora"]["rank"] == 128


@pytest.mark.parametrize("pair_resolution, sampling_resolution", [(64, None), (32, 64)],
                         ids=["pairs larger than the model's resolution", "pairs smaller (SD2.1: 512 data, 768 model)"])
def test_mixed_latents_resize_real_images_to_the_sampling_resolution(tiny_sd, captioner, tiny_pairs, pair_resolution,
                                                                     sampling_resolution):
    from t2i_align.datamodules.pairs import PairDataset, PairSource, collate_pairs

    module = make(tiny_sd, captioner, steps=4, mix_ratio=0.5, mix_t1=450, mix_t2=450)
    module.sampling = module.sampling.replace(resolution=sampling_resolution)
    resolution = sampling_resolution or module.generator.default_resolution
    assert pair_resolution != resolution  # the tiny model samples at 32 px by default
    pairs = collate_pairs([PairDataset.from_source(PairSource(tiny_pairs), pair_resolution, 0)[i] for i in range(2)])
    encoded, original = [], module.generator.encode_images

    def encode(pixels, rng=None):
        encoded.append(pixels)
        return original(pixels, rng)

    module.generator.encode_images = encode
    images, captions, _ = module.mixed_latents(pairs, torch.Generator().manual_seed(0))  # was a shape error
    assert images.shape == (1, 3, resolution, resolution) and len(captions) == 1
    [pixels] = encoded
    assert pixels.shape == (1, 3, resolution, resolution) and 0 <= pixels.min() and pixels.max() <= 1
    resized = torch.nn.functional.interpolate(pairs["pixel_values"][:1], size=(resolution, resolution), mode="bicubic",
                                              antialias=True)
    torch.testing.assert_close(pixels, resized.clamp(0, 1))


def saved_bytes(fn):
    """``fn()`` and the bytes of the tensors its autograd graph keeps for the backward (distinct storages)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_activation_checkpointing_keeps_the_gradients_and_saves_memory(tiny_sd, captioner, tiny_pairs):
    # the VAE decode of the grad path (generated and mixed latents) and the discriminator in the generator's loss
    from t2i_align.datamodules.pairs import PairDataset, PairSource, collate_pairs

    pairs = collate_pairs([PairDataset.from_source(PairSource(tiny_pairs), 32, 0)[i] for i in range(2)])
    grads, graph = {}, {}
    for on in (False, True):
        module = make(tiny_sd, captioner, adversarial_weight=1.0, discriminator_lora=LoraSettings(rank=2), mix_ratio=0.5,
                      activation_checkpointing=on)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # LoRA that changes the output, in the generator and the discriminator (B = 0 at init)
            for name, p in sorted(module.named_parameters()):
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        params = [p for name, p in module.named_parameters() if name in module.generator_trainable()]
        (loss, logs, _), graph[on] = saved_bytes(lambda m=module: m.generator_loss(
            {"pairs": pairs}, PROMPTS, SEEDS, torch.Generator().manual_seed(0)))
        assert {"train/i2t_loss", "train/adv_loss", "train/mix_start_step"} <= set(logs)
        grads[on] = torch.autograd.grad(loss, params)
    assert any(g.abs().max() > 0 for g in grads[True])
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    assert graph[True] < 0.8 * graph[False]


# ------------------------------------------------------------------------------------------------------ SDXL
def test_sdxl_discriminator_gets_the_empty_prompts_sdxl_condition(tiny_sdxl, captioner):
    # SDXL's UNet (and so the discriminator, a copy of it) needs the pooled embedding and the size/crop ids besides
    # the hidden states: the empty prompt's (CoMat's SDXL discriminator reads the negative prompt's, gan_sdxl.py)
    from t2i_align.diffusion.generator import XLCondition

    module = make(tiny_sdxl, captioner, steps=4, adversarial_weight=0.5, discriminator_lora=LoraSettings(rank=2))
    empty = module.generator.empty_embedding()
    assert isinstance(empty, XLCondition)
    seen = []
    original = module.discriminator.unet.forward

    def spy(latents, t, **kwargs):
        seen.append(kwargs)
        return original(latents, t, **kwargs)

    module.discriminator.unet.forward = spy
    latents = torch.randn(3, 4, 8, 12)  # not square: height and width land in their own ids
    logits = module.discriminate(latents)
    assert logits.shape == (3, 1, 8, 12)
    [kwargs] = seen
    torch.testing.assert_close(kwargs["encoder_hidden_states"], empty.hidden.expand(3, -1, -1))
    added = kwargs["added_cond_kwargs"]
    torch.testing.assert_close(added["text_embeds"], empty.pooled.expand(3, -1))
    h, w = (8 * module.generator.vae_scale_factor, 12 * module.generator.vae_scale_factor)
    torch.testing.assert_close(added["time_ids"], torch.tensor([[h, w, 0, 0, h, w]] * 3, dtype=torch.float32))
    # the logits follow the pooled embedding: the added condition reaches the discriminator's UNet
    shifted = XLCondition(empty.hidden, empty.pooled + 1.0)
    module.generator._empty_embedding = shifted
    assert not torch.allclose(module.discriminate(latents), logits)


def test_sdxl_real_latents_are_the_frozen_models_and_the_recipe_has_their_shape(tiny_sdxl, captioner):
    module = make(tiny_sdxl, captioner, steps=4, adversarial_weight=0.5, discriminator_lora=LoraSettings(rank=2))
    with torch.no_grad():
        for name, p in module.generator_trainable().items():
            if "lora_B" in name:
                p.normal_(std=0.5)
        online = module.generator.sample(PROMPTS, SEEDS, decode=False, sampling=module.sampling).latents
        real = module.real_latents(PROMPTS, SEEDS)
        base = Generator(GeneratorConfig(tiny_sdxl, lora=None)).sample(PROMPTS, SEEDS, decode=False,
                                                                         sampling=module.sampling)
    torch.testing.assert_close(real, base.latents, atol=1e-5, rtol=0)
    assert (online - real).abs().max() > 1e-3
    recipe = module.real_latents_recipe()
    side = module.generator.default_resolution // module.generator.vae_scale_factor
    assert recipe["latent_shape"] == [4, side, side] == list(real.shape[1:])


def test_sdxl_one_step_updates_g_and_d_and_feeds_the_captioner_images_in_0_1(tiny_sdxl, captioner, tiny_pairs,
                                                                             tmp_path, monkeypatch):
    # CoMat-SDXL as configs/experiment/comat_sdxl.yaml (lambda 0.5, detached grad-step inputs) with every part on.
    # CoMat's SDXL + GAN code feeds BLIP images in [-1, 1] (../shared/METHODS.md section 3): ours stay in [0, 1].
    from t2i_align.datamodules import T2IDataModule
    from t2i_align.datamodules.pairs import PairSource
    from t2i_align.datamodules.prompts import PromptSource

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    module = make(tiny_sdxl, captioner, adversarial_weight=0.5, detach_input=True,
                  discriminator_lora=LoraSettings(rank=2), mix_ratio=0.5, segmenter=HalfSegmenter())
    resolution = module.generator.default_resolution
    data = T2IDataModule(train_prompts=[PromptSource(str(tmp_path / "prompts.txt"))],
                         train_pairs=PairSource(tiny_pairs), batch_size=2, resolution=resolution)
    captioned, conditions = [], []
    original_ll, original_forward = captioner.log_likelihood, module.discriminator.forward

    def spy_ll(images, texts, rng=None):
        captioned.append(images.detach())
        return original_ll(images, texts, rng)

    def spy_forward(latents, condition):
        conditions.append(condition)
        return original_forward(latents, condition)

    monkeypatch.setattr(captioner, "log_likelihood", spy_ll)
    monkeypatch.setattr(module.discriminator, "forward", spy_forward)
    digests = {"g": trainable_digest(module.generator), "d": trainable_digest(module.discriminator)}
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1
    assert trainable_digest(module.generator) != digests["g"]
    assert trainable_digest(module.discriminator) != digests["d"]
    assert {"train/i2t_loss", "train/adv_loss", "train/d_loss", "train/pos_loss", "train/neg_loss"} <= set(
        trainer.callback_metrics)
    [images] = captioned  # generated (2) and mixed (1) images, decoded: [0, 1], not the VAE's [-1, 1]
    assert images.shape == (3, 3, resolution, resolution)
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0
    assert conditions and all(set(c["added_cond_kwargs"]) == {"text_embeds", "time_ids"} for c in conditions)


def test_sdxl_cache_command_writes_the_on_the_fly_real_latents(tiny_sdxl, captioner, tmp_path):
    # the real latents' cache (python -m t2i_align.commands.comat_cache, the paper's Appendix E) on SDXL
    from t2i_align.commands.comat_cache import main as fill_cache
    from t2i_align.lightning_modules.comat.real_latents import cache_entry_name, read_recipe
    from tests.helpers import REPO_ROOT

    configs = Path(REPO_ROOT) / "configs"
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    folder = tmp_path / "cache"
    fill_cache([str(folder), "--config", str(configs / "method/comat.yaml"),
                "--config", str(configs / "model/sdxl.yaml"), f"--model.init_args.generator.pretrained={tiny_sdxl}",
                "--model.init_args.generator.weight_dtype=float32", "--model.init_args.generator.lora.rank=4",
                "--model.init_args.discriminator_lora.rank=2",
                f"--model.init_args.captioner.init_args.pretrained={captioner.model.name_or_path}",
                "--model.init_args.captioner.init_args.prefix=", "--model.init_args.sampling.num_inference_steps=6",
                "--model.init_args.num_grad_steps=2", "--model.init_args.grad_stride=3",
                "--data=t2i_align.datamodules.T2IDataModule",
                f"--data.init_args.train_prompts=[{{path: {tmp_path / 'prompts.txt'}}}]",
                "--data.init_args.batch_size=2", "--batch-size", "2", "--device", "cpu"])
    module = make(tiny_sdxl, captioner, adversarial_weight=0.5, discriminator_lora=LoraSettings(rank=2),
                  real_latents=str(folder))
    ids = ["0", "1"]
    seeds = module.prompt_seeds(ids, PROMPTS)
    assert read_recipe(folder) == module.real_latents_recipe()
    cached = module.real_latents(PROMPTS, seeds, ids)
    with torch.no_grad():
        base = Generator(GeneratorConfig(tiny_sdxl, lora=None)).sample(PROMPTS, seeds, decode=False,
                                                                         sampling=module.sampling).latents
    torch.testing.assert_close(cached, base, atol=1e-4, rtol=1e-5)
    assert (folder / cache_entry_name("0", PROMPTS[0])).exists()
