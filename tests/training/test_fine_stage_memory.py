"""Issue 27: FineStage's attention edit in place, one sample at a time, and the attention scores without a full-size
ignored input: the same numbers bit for bit as before, with far less memory (measured on the meta device by
experiments/benchmarks/fine_stage_memory.py, smoke-checked here at a small size)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from t2i_align.diffusion.attention import EditContext, scores_to_probs
from t2i_align.diffusion.generator import GeneratorConfig
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.lightning_modules import fine_stage as fs
from tests.helpers import REPO_ROOT, FixedTagger, HalfSegmenter


def load_benchmark():
    path = Path(REPO_ROOT) / "experiments" / "benchmarks" / "fine_stage_memory.py"
    spec = importlib.util.spec_from_file_location("fine_stage_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = load_benchmark()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_modulation_is_the_out_of_place_one_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(3, 16, 16, generator=g) * 4).to(dtype)
    m = fs.Modulation(torch.rand(16, 16, generator=g) > 0.6, torch.rand(16, 1, generator=g))
    expected = fs.modulate(scores, m, 0.37)
    edited = scores.clone()
    assert fs.modulate_(edited, m, 0.37) is edited and torch.equal(edited, expected)


@pytest.mark.parametrize("kind, cfg", [("attn1", True), ("attn1", False), ("attn2", True)])
def test_the_edit_equals_the_old_stacked_edit_on_random_masks(kind, cfg):
    batch, side, heads = 3, 8, 2
    objects = BENCH.random_objects(batch, side * 8, per_image=3, seed=1)
    objects[1] = []  # an image without objects: weight 0, unchanged
    edit = BENCH.self_edit(objects, side)
    keys = side * side if kind == "attn1" else 12
    ctx = EditContext(f"down_blocks.{kind}", 0, 961, heads, cfg, (side, side))
    build = (lambda o: fs.self_modulation(o, (side, side))) if kind == "attn1" else \
        (lambda o: fs.cross_modulation(o, (side, side), keys))
    lam = (0.3 if kind == "attn1" else 1.0) * (961 / 1000) ** 5
    scores = torch.randn((2 if cfg else 1) * batch * heads, side * side, keys, generator=torch.Generator().manual_seed(2))
    expected = BENCH.old_edit(scores.clone(), ctx, [build(o) for o in objects], lam)
    assert torch.equal(edit.fn(scores.clone(), ctx), expected)
    with torch.enable_grad():  # scores that need a gradient take the out-of-place path: the same numbers
        leaf = scores.clone().requires_grad_(True)
        assert torch.equal(edit.fn(leaf * 1, ctx), expected)


@pytest.mark.parametrize("upcast", [False, True])
def test_scores_without_the_full_size_empty_input_are_the_same(upcast):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 32, 8, generator=g), torch.randn(4, 20, 8, generator=g)
    attn = SimpleNamespace(upcast_attention=upcast, upcast_softmax=upcast, scale=8 ** -0.5)
    ctx = EditContext("x.attn2", 0, 1, 2, False, None)
    assert torch.equal(scores_to_probs(attn, q, k, None, (), ctx), BENCH.old_scores_to_probs(attn, q, k, None, (), ctx))


def test_fine_stage_images_equal_the_old_edits_bit_for_bit(tiny_sd, monkeypatch):
    module = fs.FineStage(GeneratorConfig(pretrained=tiny_sd, lora=None), tagger=FixedTagger(["red circle", "square"]),
                          judge=SimpleNamespace(__call__=None), segmenter=HalfSegmenter())
    gen = module.generator
    res = gen.default_resolution
    g = torch.Generator().manual_seed(4)
    objects = [[fs.LocalObject(f"t{j}", label, f"t{j}", torch.rand(res, res, generator=g) > 0.5, (2 + j,))
                for j, label in enumerate(labels)] for labels in (["certain", "may"], ["unlikely"], ["certain"])]
    sampling = SamplingSettings(4, guidance_scale=5.0)
    edits = module.modulation_edits(objects, sampling)
    prompts, seeds = ["a red circle", "a square", "a red square"], [1, 2, 3]
    with torch.no_grad():
        new = gen.sample(prompts, seeds, sampling, attention_edits=edits, decode=False).latents
        # the old edit: modulate out of place, written back (the stack and concatenation hold the same numbers)
        monkeypatch.setattr(fs, "modulate_", lambda scores, m, lam: scores.copy_(fs.modulate(scores, m, lam)))
        old = gen.sample(prompts, seeds, sampling, attention_edits=module.modulation_edits(objects, sampling),
                         decode=False).latents
    assert torch.equal(new, old)


def test_the_edit_and_the_call_need_far_less_memory():
    r = BENCH.measure(batch=4, side=16, heads=2, head_dim=8, dtype=torch.float32)
    scores = r["scores_gib"]
    # before: the edited half stacked (scores / 2) and concatenated (scores); after: one sample's heads x N x N
    assert r["peak_gib"]["edit_before"] == pytest.approx(1.5 * scores, rel=0.01)
    assert r["peak_gib"]["edit_after"] == pytest.approx(scores / 8, rel=0.02)
    # the call: the ignored full-size input, the scores, the edit's copies, the probabilities -> scores and probs
    assert r["peak_gib"]["call_before"] == pytest.approx(3.5 * scores, rel=0.01)
    assert r["peak_gib"]["call_after"] == pytest.approx(2 * scores, rel=0.01)
