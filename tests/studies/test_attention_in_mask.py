"""The attention-in-mask measurement: attention on the drawn object scores near 1, a uniform map scores chance."""

import pytest
import torch
from transformers import CLIPTokenizer

from t2i_align.diffusion.attention import AttentionStore
from t2i_align.diffusion.tokens import find_phrase
from t2i_align.studies.attention_in_mask import MAP_SIZE, noun_shares
from t2i_align.toyworld.experts.judge import ToyJudge
from tests.helpers import RenderingGenerator

PROMPTS = ["a red circle and a blue square", "a green star to the left of a yellow triangle"]


class AttendingGenerator(RenderingGenerator):
    """Renders each prompt exactly and records one 8x8 map per image: each noun's tokens on its object's centre
    cell (``focused``) or every token spread evenly."""

    def __init__(self, tokenizer, focused: bool) -> None:
        super().__init__()
        self.tokenizer, self.focused = tokenizer, focused

    def sample(self, prompts, seeds, sampling=None, **kwargs):
        out = super().sample(prompts, seeds, sampling)
        maps = torch.full((len(prompts), MAP_SIZE, MAP_SIZE, 77), 1 / 77)
        if self.focused:
            for i, (prompt, found) in enumerate(zip(prompts, ToyJudge().detect_batch(out.images))):
                for d in found:
                    for k in find_phrase(prompt, d.shape, self.tokenizer):
                        maps[i, :, :, k] = 0
                        maps[i, int(d.y) // 8, int(d.x) // 8, k] = 1
        store = AttentionStore()
        store.maps[(0, "up_blocks.1.attentions.0.transformer_blocks.0.attn2")] = maps
        return type(out)(out.latents, out.images, store, ())


@pytest.mark.parametrize("focused", [True, False])
def test_share_of_attention_inside_the_drawn_object(tiny_sd, focused):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    rows = noun_shares(AttendingGenerator(tokenizer, focused), PROMPTS, [0, 1], ToyJudge())
    assert [r["noun"] for r in rows] == ["circle", "square", "star", "triangle"]
    for r in rows:
        assert 0 < r["chance"] < 0.2
        if focused:
            assert r["share"] >= 0.4 and r["share"] > 10 * r["chance"], r  # a small object fills part of its cell
        else:
            assert r["share"] == pytest.approx(r["chance"], rel=1e-5)


def test_models_are_the_chosen_checkpoints_and_the_asked_steps(tmp_path):
    import json

    from t2i_align.studies.attention_in_mask import models_of

    run = tmp_path / "run"
    folder = run / "logs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (100, 500, 1000):
        (folder / f"epoch=0-step={step}.ckpt").write_bytes(b"")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"models": {
        "Base": {"configs": ["b.yaml"], "checkpoint": None},
        "A (step 500)": {"configs": ["a.yaml"], "checkpoint": str(folder / "epoch=0-step=500.ckpt"), "curve": {},
                         "arm": "A", "step": 500, "overrides": ["--x=1"]}}}))
    models = models_of([results], steps=[500, 1000])
    assert [m.name for m in models] == ["Base", "A (step 500)", "A (step 1000)"]  # the chosen step is not repeated
    assert models[2].checkpoint.endswith("step=1000.ckpt") and models[2].overrides == ("--x=1",)
