"""Cross-attention capture: same output as SDPA, proper probabilities, gradients under checkpointing."""

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from t2i_align.diffusion.attention import (
    CaptureProcessor,
    ScoreEdit,
    cross_attention_layer_names,
    self_attention_layer_names,
)
from t2i_align.diffusion.generator import Generator, GeneratorConfig
from t2i_align.diffusion.policies import Strided
from t2i_align.diffusion.sampling import SamplingSettings


def make(path, **kw) -> Generator:
    gen = Generator(GeneratorConfig(pretrained=path, **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return gen


def test_only_chosen_cross_attention_layers_get_the_capture_processor(tiny_sd):
    gen = make(tiny_sd)
    layers = cross_attention_layer_names(gen.unet)
    assert layers and all(n.endswith("attn2") and n.startswith(("mid_block", "up_blocks")) for n in layers)
    gen.enable_attention_capture()
    procs = gen.unet.attn_processors
    for name, proc in procs.items():
        layer = name.removesuffix(".processor")
        expected = CaptureProcessor if layer in layers else AttnProcessor2_0
        assert type(proc) is expected, name


def test_capture_output_equals_sdpa_and_maps_are_distributions(tiny_sd):
    gen = make(tiny_sd)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    emb = gen.encode_prompts(["a red circle and a blue square", "two green stars"])
    t = torch.tensor([500, 500])
    with torch.no_grad():
        reference = gen.unet_forward(x, t, emb)
        store = gen.enable_attention_capture()
        with store.record(step=0, cfg=False, latent_hw=(16, 16)):
            captured = gen.unet_forward(x, t, emb)
    torch.testing.assert_close(captured, reference, atol=1e-5, rtol=1e-5)
    maps = store.layers(0)
    assert set(maps) == set(cross_attention_layer_names(gen.unet))
    for m in maps.values():
        assert m.shape[0] == 2 and m.shape[-1] == 77
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), atol=1e-5, rtol=0)
    groups = store.by_resolution(0)
    assert sorted(groups) == [8, 16] and all(g[0].shape[1:3] == (r, r) for r, g in groups.items())


def test_cfg_keeps_the_conditional_half_only(tiny_sd):
    gen = make(tiny_sd)
    cfg, no_cfg = SamplingSettings(num_inference_steps=3, guidance_scale=5.0), SamplingSettings(3, guidance_scale=1.0)
    with torch.no_grad():
        out = gen.sample(["a red circle"], [0], cfg, record_attention=[0, 2], decode=False)
        # Step 0 sees the same latents in all three runs: the CFG run's kept maps must be the prompt's.
        cond = gen.sample(["a red circle"], [0], no_cfg, record_attention=[0], decode=False)
        uncond = gen.sample([""], [0], no_cfg, record_attention=[0], decode=False)
    assert out.attention.steps == [0, 2]
    assert all(m.shape[0] == 1 for m in out.attention.layers(2).values())
    for name, m in out.attention.layers(0).items():
        torch.testing.assert_close(m, cond.attention.layers(0)[name], atol=1e-6, rtol=1e-5)
        assert (m - uncond.attention.layers(0)[name]).abs().max() > 1e-4


def test_maps_carry_gradient_under_checkpointing(tiny_sd):
    grads = []
    for ckpt in (False, True):
        gen = make(tiny_sd, gradient_checkpointing=ckpt)
        out = gen.sample(["a red circle"], [0], SamplingSettings(6, guidance_scale=3.0), policy=Strided(2, 2),
                         policy_rng=torch.Generator().manual_seed(0), record_attention=True, decode=False)
        assert len(out.attention.steps) == 2  # both grad steps, each under its own key
        loss = sum((m[..., 1:4] ** 2).sum() for step in out.attention.steps for m in out.attention.layers(step).values())
        assert loss.requires_grad
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in gen.trainable_parameters()]))
        # the backward re-run must not have added or replaced maps
        assert len(out.attention.maps) == 2 * len(cross_attention_layer_names(gen.unet))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_identity_edit_reproduces_plain_sampling_and_capture_works_in_the_same_call(tiny_sd):
    """An edit that returns the scores unchanged gives the images of plain sampling: bit for bit those of a
    capture-only call on the same layers and steps (both take the explicit softmax path), and those of SDPA
    sampling up to float rounding, also when it edits self-attention layers at every step."""
    gen = make(tiny_sd)
    cross = cross_attention_layer_names(gen.unet)
    selfs = self_attention_layer_names(gen.unet)
    seen = []
    identity = ScoreEdit(lambda scores, ctx: seen.append((ctx.layer, ctx.step, ctx.timestep)) or scores, cross, steps={0, 2})
    everywhere = ScoreEdit(lambda scores, ctx: scores, [*cross, *selfs])
    sampling = SamplingSettings(num_inference_steps=4, guidance_scale=5.0)
    kw = dict(sampling=sampling, decode=False)
    prompts, seeds = ["a red circle", "two green stars"], [0, 1]
    with torch.no_grad():
        plain = gen.sample(prompts, seeds, **kw).latents
        captured = gen.sample(prompts, seeds, record_attention=[0, 2], **kw)
        edited = gen.sample(prompts, seeds, record_attention=[0, 2], attention_edits=[identity], **kw)
        edited_everywhere = gen.sample(prompts, seeds, attention_edits=[everywhere], **kw).latents
    assert {step for _, step, _ in seen} == {0, 2} and {layer for layer, _, _ in seen} == set(cross)
    timesteps = gen.make_scheduler(sampling).timesteps.tolist()  # an edit is told the timestep of its step
    assert {(step, t) for _, step, t in seen} == {(0, timesteps[0]), (2, timesteps[2])}
    assert torch.equal(edited.latents, captured.latents)
    for step in (0, 2):
        for name, m in captured.attention.layers(step).items():
            assert torch.equal(edited.attention.layers(step)[name], m)
    torch.testing.assert_close(edited.latents, plain, atol=1e-4, rtol=1e-5)  # explicit softmax vs SDPA: up to 2e-5 apart at one thread
    torch.testing.assert_close(edited_everywhere, plain, atol=1e-4, rtol=1e-5)
    assert gen.attention_store.edits == ()  # an edit lasts one call


def test_an_edit_changes_the_scores_of_its_layers_and_steps_only(tiny_sd):
    gen = make(tiny_sd)
    layer = cross_attention_layer_names(gen.unet)[0]

    def block_token_1(scores, ctx):
        assert ctx.cfg and ctx.heads == gen.unet.get_submodule(layer).heads
        scores = scores.clone()
        cond = scores.chunk(2)[1]  # [uncond; cond]: change the conditional branch only
        cond[..., 1] = float("-inf")
        return scores

    kw = dict(sampling=SamplingSettings(3, guidance_scale=5.0), decode=False, record_attention=[0, 1])
    with torch.no_grad():
        base = gen.sample(["a red circle"], [0], **kw)
        edited = gen.sample(["a red circle"], [0], attention_edits=[ScoreEdit(block_token_1, [layer], steps={1})], **kw)
    maps = edited.attention.layers(1)
    assert torch.equal(maps[layer][..., 1], torch.zeros_like(maps[layer][..., 1]))  # capture sees the edit
    torch.testing.assert_close(maps[layer].sum(-1), torch.ones(maps[layer].shape[:-1]), atol=1e-5, rtol=0)
    assert base.attention.layers(1)[layer][..., 1].max() > 0
    for name, m in edited.attention.layers(0).items():  # step 0 is before the edit: unchanged
        assert torch.equal(m, base.attention.layers(0)[name])
    assert not torch.equal(edited.latents, base.latents)


def test_step_hook_sees_every_step_and_can_replace_the_latents(tiny_sd):
    gen = make(tiny_sd)
    kw = dict(sampling=SamplingSettings(4, guidance_scale=3.0), decode=False)
    calls = []
    with torch.no_grad():
        plain = gen.sample(["a red circle"], [0], **kw).latents
        watched = gen.sample(["a red circle"], [0], step_hook=lambda i, t, x: calls.append((i, int(t), x.shape)), **kw)
        scaled = gen.sample(["a red circle"], [0], step_hook=lambda i, t, x: x * 0.5 if i == 3 else None, **kw).latents
    assert [i for i, _, _ in calls] == [0, 1, 2, 3] and calls[0][1] > calls[-1][1]  # timesteps run down
    assert torch.equal(watched.latents, plain)  # a hook that returns nothing changes nothing
    torch.testing.assert_close(scaled, plain * 0.5)  # returned latents replace the step's (here the last)
