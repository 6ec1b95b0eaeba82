"""The fast paths of no-grad sampling compute what the reference paths compute: LoRA merged into plain layers
(bit for bit for a zero adapter, float rounding otherwise, the model's own weights untouched)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from t2i_align.diffusion.lora import PlainLayers
from tests.helpers import REPO_ROOT

TOYWORLD = os.path.join(REPO_ROOT, "models", "toyworld", "pipeline")
WIDE = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def toy_unet(rank: int = 4, targets=("to_q", "to_k", "to_v", "to_out.0"), std: float = 0.0) -> UNet2DConditionModel:
    """The committed ToyWorld UNet with a LoRA adapter (``std`` > 0: random B, so the adapter is not zero)."""
    unet = UNet2DConditionModel.from_pretrained(TOYWORLD, subfolder="unet").eval().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    if std:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
    return unet


def inputs(batch: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 8, 8, 8, generator=gen), torch.tensor(601),
            torch.randn(batch, 77, 128, generator=gen))


def snapshot(module: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {k: (v.data_ptr(), v.detach().clone()) for k, v in module.state_dict(keep_vars=True).items()}


def assert_untouched(module: torch.nn.Module, before: dict, modules_before: dict) -> None:
    after = module.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for key, (ptr, value) in before.items():
        assert after[key].data_ptr() == ptr, key  # the same storage: never swapped or re-assigned
        assert torch.equal(after[key].detach(), value), key  # and bit for bit the same values
    assert dict(module.named_modules()) == modules_before  # every wrapper back in its slot


@torch.no_grad()
def test_zero_adapter_is_bit_identical_and_merges_nothing():
    unet = toy_unet(rank=8, targets=WIDE)  # peft's initialisation: B = 0
    x, t, c = inputs()
    reference = unet(x, t, encoder_hidden_states=c).sample
    plain = PlainLayers(unet)
    assert len(plain) > 0 and plain.merged == 0
    with plain.applied():
        assert not any("lora_A" in name for name, _ in unet.named_modules())  # the wrappers are out
        fast = unet(x, t, encoder_hidden_states=c).sample
    assert torch.equal(fast, reference)


@torch.no_grad()
def test_merged_adapter_equals_wrappers_to_float_rounding_and_leaves_the_weights_untouched():
    unet = toy_unet(rank=16, targets=WIDE, std=0.05)
    x, t, c = inputs()
    reference = unet(x, t, encoder_hidden_states=c).sample
    before, modules_before = snapshot(unet), dict(unet.named_modules())
    plain = PlainLayers(unet)
    assert plain.merged == len(plain) > 50
    with plain.applied():
        fast = unet(x, t, encoder_hidden_states=c).sample
    assert_untouched(unet, before, modules_before)
    assert not torch.equal(fast, reference)  # merged: a different (but as exact) float computation
    # the exact function, in float64: merged and unmerged float32 are equally close to it (rounding, no error)
    exact = copy.deepcopy(unet).double()(x.double(), t, encoder_hidden_states=c.double()).sample
    err_fast, err_ref = (fast.double() - exact).abs().max(), (reference.double() - exact).abs().max()
    scale = exact.abs().max()
    assert err_fast < 1e-5 * scale and err_ref < 1e-5 * scale
    assert err_fast < 4 * err_ref + 1e-7 * scale
    assert (fast - reference).abs().max() < 1e-5 * scale
    # after any number of uses the weights are still the originals (no merge/unmerge float drift)
    for _ in range(3):
        with PlainLayers(unet).applied():
            unet(x, t, encoder_hidden_states=c)
    assert_untouched(unet, before, modules_before)
    assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, reference)


@torch.no_grad()
def test_disabled_adapters_are_the_base_layers():
    unet = toy_unet(rank=8, targets=WIDE, std=0.05)
    x, t, c = inputs()
    unet.disable_adapters()
    try:
        reference = unet(x, t, encoder_hidden_states=c).sample
        plain = PlainLayers(unet)
        assert plain.merged == 0 and plain.active == 0
        with plain.applied():
            assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, reference)
    finally:
        unet.enable_adapters()


def test_refused_with_grad_and_restored_after_an_error():
    unet = toy_unet(std=0.05)
    modules_before = dict(unet.named_modules())
    plain = PlainLayers(unet)
    with pytest.raises(RuntimeError, match="no_grad"):
        with plain.applied():
            pass
    with torch.no_grad(), pytest.raises(KeyError):
        with plain.applied():
            raise KeyError("boom")
    assert dict(unet.named_modules()) == modules_before


# ------------------------------------------------------------------------------------------- through the sampler
PROMPTS = ["a red circle", "two blue squares to the left of a green star", "a big striped yellow triangle"]


@pytest.fixture(scope="module")
def toy_generators():
    """The ToyWorld pipeline with a zero rank-4 attention adapter and with a random rank-8 wide adapter."""
    from t2i_align.diffusion.generator import Generator, GeneratorConfig, LoraSettings

    zero = Generator(GeneratorConfig(pretrained=TOYWORLD, lora=LoraSettings(rank=4))).eval()
    wide = Generator(GeneratorConfig(pretrained=TOYWORLD, lora=LoraSettings(rank=8, target_modules=WIDE))).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in wide.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return zero, wide


def sample_both(generator, **kwargs):
    """(reference, fast) outputs of the same call."""
    from t2i_align.diffusion.sampling import SamplingSettings

    kwargs.setdefault("sampling", SamplingSettings(num_inference_steps=6, guidance_scale=5.0))
    outs = []
    for fast in (False, True):
        generator.fast_sampling = fast
        try:
            outs.append(generator.sample(PROMPTS, [3, 4, 5], **kwargs))
        finally:
            generator.fast_sampling = True
    return outs


def processors(unet) -> dict:
    return {name: p for name, p in unet.attn_processors.items()}


@torch.no_grad()
def test_zero_adapter_sampling_is_bit_identical_and_uses_the_key_value_cache(toy_generators, monkeypatch):
    from t2i_align.diffusion import generator as generator_module

    zero, _ = toy_generators
    caches = []
    original = generator_module.key_value_cache

    def spy(unet):
        context = original(unet)
        cache = context.__enter__()
        caches.append(cache)
        return _Entered(context, cache)

    monkeypatch.setattr(generator_module, "key_value_cache", spy)
    before = processors(zero.unet)
    ref, fast = sample_both(zero)
    assert torch.equal(fast.latents, ref.latents) and torch.equal(fast.images, ref.images)
    assert len(caches) == 1 and caches[0].hits > 0  # only the fast call has a cache, and it reused keys and values
    assert processors(zero.unet) == before  # every layer has its own processor back


class _Entered:
    """A context manager already entered (for the spy above)."""

    def __init__(self, context, value) -> None:
        self.context, self.value = context, value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)


@torch.no_grad()
def test_merged_sampling_equals_reference_to_float_rounding_and_restores_the_model(toy_generators):
    _, wide = toy_generators
    before, modules_before, procs = snapshot(wide.unet), dict(wide.unet.named_modules()), processors(wide.unet)
    ref, fast = sample_both(wide)
    assert not torch.equal(fast.latents, ref.latents)  # the merged weights were used
    scale = ref.latents.abs().max()
    assert (fast.latents - ref.latents).abs().max() < 1e-4 * scale
    assert (fast.images - ref.images).abs().max() < 1e-4
    assert_untouched(wide.unet, before, modules_before)
    assert processors(wide.unet) == procs
    # repeated fast sampling changes nothing of the model: the same call gives the same images, bit for bit
    again = sample_both(wide)[1]
    assert torch.equal(again.latents, fast.latents)
    assert_untouched(wide.unet, before, modules_before)


def test_grad_chain_with_recorded_attention_matches_reference(toy_generators):
    """A CoMat-like chain: grad steps through the wrappers (LoRA gradients), no-grad steps merged, attention
    recorded at grad steps by capture processors (which use the cache on their no-grad calls)."""
    from t2i_align.diffusion.policies import Strided
    from t2i_align.diffusion.sampling import SamplingSettings

    _, wide = toy_generators
    wide.enable_attention_capture()
    try:
        results = []
        for fast in (False, True):
            wide.fast_sampling = fast
            wide.zero_grad(set_to_none=True)
            out = wide.sample(PROMPTS, [3, 4, 5], SamplingSettings(num_inference_steps=8, guidance_scale=5.0),
                              policy=Strided(2, 3), policy_rng=torch.Generator().manual_seed(0), record_attention=True)
            loss = out.images.square().mean() + sum(m.square().mean() for m in out.attention.maps.values())
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in wide.trainable_parameters()])
            results.append((out, grads))
        wide.fast_sampling = True
        (ref, g_ref), (fast, g_fast) = results
        assert set(fast.attention.maps) == set(ref.attention.maps) and len(ref.attention.maps) > 0
        for key, value in ref.attention.maps.items():
            assert (fast.attention.maps[key] - value).abs().max() < 1e-4
        assert g_ref.abs().max() > 0
        assert (g_fast - g_ref).abs().max() < 1e-4 * g_ref.abs().max()
        assert all(p.cache is None for p in wide.unet.attn_processors.values() if hasattr(p, "cache"))
    finally:
        wide.fast_sampling = True


# ------------------------------------------------------------------------------------- the base model on a lane
def test_base_model_is_the_disabled_adapters_and_runs_on_a_lane(toy_generators):
    import threading

    from t2i_align.diffusion.generator import BackgroundLane
    from t2i_align.diffusion.sampling import SamplingSettings

    _, wide = toy_generators
    keys, modules_before = set(wide.state_dict()), dict(wide.named_modules())
    base = wide.base_model()
    assert wide.base_model() is base  # built once
    assert set(wide.state_dict()) == keys and dict(wide.named_modules()) == modules_before  # not a submodule
    assert not any("lora" in name for name, _ in base.unet.named_modules())
    assert {id(p) for p in base.unet.parameters()} <= {id(p) for p in wide.unet.parameters()}  # shared, not copied
    settings = SamplingSettings(num_inference_steps=5, guidance_scale=5.0, scheduler="ddpm")
    with torch.no_grad():
        wide.unet.disable_adapters()
        try:
            reference = wide.sample(PROMPTS, [3, 4, 5], settings, decode=False).latents
        finally:
            wide.unet.enable_adapters()
        assert torch.equal(base.sample(PROMPTS, [3, 4, 5], settings, decode=False).latents, reference)
        online = wide.sample(PROMPTS, [3, 4, 5], settings, decode=False).latents
    threads = torch.get_num_threads()
    lane = BackgroundLane(lambda: base.sample(PROMPTS, [3, 4, 5], settings, decode=False).latents)
    assert lane.thread.name == "t2i-lane" and lane.thread is not threading.current_thread()
    with torch.no_grad():  # the online model samples meanwhile, through its own modules
        beside = wide.sample(PROMPTS, [3, 4, 5], settings, decode=False, step_hook=lane.poll).latents
    on_lane = lane.result()
    assert torch.get_num_threads() == threads  # the caller's threads are back
    scale = reference.abs().max()
    assert (on_lane - reference).abs().max() < 1e-4 * scale  # 1 thread instead of 2: float rounding at most
    assert (beside - online).abs().max() < 1e-4 * scale
    assert not torch.equal(online, reference)  # the adapters were on for the online model


def test_lane_reraises_the_error_of_its_thread():
    from t2i_align.diffusion.generator import BackgroundLane

    threads = torch.get_num_threads()

    def fail():
        raise KeyError("lane")

    lane = BackgroundLane(fail)
    with pytest.raises(KeyError, match="lane"):
        lane.result()
    assert torch.get_num_threads() == threads


@torch.no_grad()
def test_halves_on_two_threads_match_the_reference(toy_generators, monkeypatch):
    """A batch of SPLIT_MIN_BATCH rows on a 2-thread CPU runs as two halves on two threads, keys and values cached
    per half; it computes what one call computes (to float rounding; bit for bit on the machine it was measured on)."""
    from t2i_align.diffusion import generator as generator_module
    from t2i_align.diffusion.sampling import SamplingSettings

    zero, _ = toy_generators
    calls, caches = [], []
    halves, key_value_cache = generator_module._HalvesOnTwoThreads.__call__, generator_module.key_value_cache

    def counting(self, *args, **kwargs):
        calls.append(torch.get_num_threads())
        return halves(self, *args, **kwargs)

    def spy(unet):
        context = key_value_cache(unet)
        caches.append(context.__enter__())
        return _Entered(context, caches[-1])

    monkeypatch.setattr(generator_module._HalvesOnTwoThreads, "__call__", counting)
    monkeypatch.setattr(generator_module, "key_value_cache", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prompts = (PROMPTS * 6)[: generator_module.SPLIT_MIN_BATCH // 2]
        settings = SamplingSettings(num_inference_steps=3, guidance_scale=5.0)
        outs = []
        for fast in (False, True):
            zero.fast_sampling = fast
            outs.append(zero.sample(prompts, list(range(len(prompts))), settings))
        assert torch.get_num_threads() == 2
    finally:
        zero.fast_sampling = True
        torch.set_num_threads(threads)
    ref, fast = outs
    assert len(calls) == 3 + 1  # every step and the decode by halves
    assert caches[0].hits == 2 * 2 * sum(1 for _ in zero.unet.attn_processors if "attn2" in _)  # 2 later steps x 2 halves
    assert (fast.latents - ref.latents).abs().max() <= 1e-5 * ref.latents.abs().max()
    assert (fast.images - ref.images).abs().max() <= 1e-5
