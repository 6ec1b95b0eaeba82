"""BlipLikelihood (CoMat's image-to-text loss): labels, HF-equivalent loss, label smoothing, gradients,
the random shift crop, input checks, and the committed ToyWorld captioner's colour sensitivity."""

import inspect
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from t2i_align.experts.captioner import BlipLikelihood, ImageToText
from tests.helpers import REPO_ROOT, save_tiny_captioner

TOY_CAPTIONER = Path(REPO_ROOT) / "models" / "toyworld" / "captioner"
PROMPTS = ["a red circle to the left of a blue square", "three green stars",
           "a photo of a cyan square, a plain blue circle, and a cyan triangle"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_tiny_captioner(tmp_path_factory.mktemp("tiny_captioner"))


def images(n: int = 3, seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def hf_loss(scorer: BlipLikelihood, image: torch.Tensor, prompt: str, smoothing: float) -> torch.Tensor:
    """transformers' own BLIP LM loss for one (image, prompt): labels = ids with -100 off the label mask."""
    ids, attention, label = scorer.tokens([prompt])
    scorer.model.text_decoder.label_smoothing = smoothing
    try:
        out = scorer.model(pixel_values=scorer.pixels(image[None]), input_ids=ids, attention_mask=attention,
                           labels=ids.masked_fill(~label, -100))
    finally:
        scorer.model.text_decoder.label_smoothing = scorer.model.config.text_config.label_smoothing
    return out.loss


def test_every_init_parameter_is_documented():
    doc = BlipLikelihood.__doc__.split("Args:")[1]
    for name in list(inspect.signature(BlipLikelihood.__init__).parameters)[1:]:
        assert f"\n        {name}: " in doc, name


def test_protocol(tiny):
    scorer = BlipLikelihood(tiny, prefix="")
    assert isinstance(scorer, ImageToText)
    assert not isinstance(object(), ImageToText)
    assert not any(p.requires_grad for p in scorer.parameters()) and not scorer.model.training
    scorer.train()
    assert not scorer.model.training  # the frozen expert stays in eval mode (no dropout)


def test_labels_are_the_prompt_and_final_sep_never_prefix_or_padding(tiny):
    scorer = BlipLikelihood(tiny, prefix="a photo of ")
    tok = scorer.tokenizer
    ids, attention, label = scorer.tokens(["A Red Circle", *PROMPTS])
    assert ids.shape == attention.shape == label.shape and label.dtype == torch.bool
    assert (ids[:, 0] == scorer.model.config.text_config.bos_token_id).all()  # [DEC] starts the decoder
    assert tok.convert_ids_to_tokens(int(ids[0, 0])) == "[DEC]"
    prefix_len = len(tok("a photo of", add_special_tokens=False).input_ids)
    assert prefix_len == 3
    for row, prompt in enumerate(["a red circle", *PROMPTS]):
        n = int(attention[row].sum())
        assert not label[row, :prefix_len + 1].any()  # [DEC] and every prefix token
        assert not label[row, n:].any() and (attention[row, n:] == 0).all()  # padding
        assert label[row, prefix_len + 1:n].all()  # every prompt token and the final [SEP]
        assert tok.convert_ids_to_tokens(ids[row, label[row]].tolist())[-1] == "[SEP]"
        assert tok.decode(ids[row, label[row]], skip_special_tokens=True) == prompt.lower()
        assert tok.decode(ids[row, 1:prefix_len + 1]) == "a photo of"
    assert (attention == 0).any()  # the batch really has padding
    # a prefix without a trailing space is joined with one; no prefix labels everything after [DEC]
    assert BlipLikelihood(tiny, prefix="a photo of").text("Red") == "a photo of red"
    bare = BlipLikelihood(tiny, prefix="", lowercase=False)
    assert bare.text("Red") == "Red"
    ids, attention, label = bare.tokens(PROMPTS[:2])
    assert torch.equal(label[:, 1:], attention[:, 1:].bool()) and not label[:, 0].any()


def test_without_smoothing_or_shift_equals_hf_loss(tiny):
    scorer = BlipLikelihood(tiny, prefix="a photo of ", label_smoothing=0.0, max_shift=0)
    x = images()
    batched = scorer.log_likelihood(x, PROMPTS)
    assert batched.shape == (3,) and batched.dtype == torch.float32 and torch.isfinite(batched).all()
    for k, prompt in enumerate(PROMPTS):
        reference = -hf_loss(scorer, x[k], prompt, 0.0)
        assert torch.allclose(batched[k], reference, atol=1e-5), (k, batched[k], reference)
    # and a direct gather over the same logits (HF's loss could drift to another default)
    ids, attention, label = scorer.tokens(PROMPTS[:1])
    logits = scorer.model(pixel_values=scorer.pixels(x[:1]), input_ids=ids, attention_mask=attention).logits
    logp = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    assert torch.allclose(batched[0], logp[label[0, 1:]].mean(), atol=1e-5)


def test_label_smoothing_follows_the_formula_and_matches_hf(tiny):
    x = images()
    values = {}
    for eps in (0.0, 0.1, 0.3):
        scorer = BlipLikelihood(tiny, prefix="a photo of ", label_smoothing=eps, max_shift=0)
        values[eps] = scorer.log_likelihood(x, PROMPTS)
    scorer = BlipLikelihood(tiny, prefix="a photo of ", label_smoothing=0.1, max_shift=0)
    assert not torch.allclose(values[0.1], values[0.0], atol=1e-4)
    # (1 - eps) * log p(y) + eps * mean_v log p(v): affine in eps with slope (mean_v log p - log p(y))
    ids, attention, label = scorer.tokens(PROMPTS)
    logits = scorer.model(pixel_values=scorer.pixels(x), input_ids=ids, attention_mask=attention).logits
    uniform = logits[:, :-1].log_softmax(-1).mean(-1)
    mask = label[:, 1:].float()
    uniform = (uniform * mask).sum(1) / mask.sum(1)
    for eps in (0.1, 0.3):
        assert torch.allclose(values[eps], (1 - eps) * values[0.0] + eps * uniform, atol=1e-5)
    for k, prompt in enumerate(PROMPTS):  # HF's LM loss with label smoothing 0.1 (CoMat's value)
        assert torch.allclose(values[0.1][k], -hf_loss(scorer, x[k], prompt, 0.1), atol=1e-5)
    # token-level values: the per-text mean of them is log_likelihood
    tokens, tmask = scorer.token_log_likelihoods(x, PROMPTS)
    assert torch.equal(tmask, label[:, 1:])
    assert torch.allclose(tokens.sum(1) / tmask.sum(1), values[0.1], atol=1e-6)


@pytest.mark.parametrize("max_shift", [0, 2])
def test_gradient_reaches_the_pixels(tiny, max_shift):
    scorer = BlipLikelihood(tiny, prefix="a photo of ", max_shift=max_shift)
    x = images(2, size=80).requires_grad_()  # 80 px: the resize to 64 is on the gradient path too
    loss = -scorer.log_likelihood(x, PROMPTS[:2], torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad[0].abs().sum() > 0) and (x.grad[1].abs().sum() > 0)


def test_shift_crop_is_reproducible_and_seeded(tiny):
    scorer = BlipLikelihood(tiny, prefix="", max_shift=2)
    x = images(4)
    crop = scorer.shift_crop(x, torch.Generator().manual_seed(3))
    assert crop.shape == (4, 3, 62, 62)
    offsets = torch.randint(0, 3, (4, 2), generator=torch.Generator().manual_seed(3)).tolist()
    for k, (dy, dx) in enumerate(offsets):
        assert torch.equal(crop[k], x[k, :, dy:dy + 62, dx:dx + 62])
    a = scorer.log_likelihood(x, PROMPTS + PROMPTS[:1], torch.Generator().manual_seed(0))
    b = scorer.log_likelihood(x, PROMPTS + PROMPTS[:1], torch.Generator().manual_seed(0))
    c = scorer.log_likelihood(x, PROMPTS + PROMPTS[:1], torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.manual_seed(5)  # rng None: the torch default generator
    d = scorer.log_likelihood(x, PROMPTS + PROMPTS[:1])
    torch.manual_seed(5)
    assert torch.equal(d, scorer.log_likelihood(x, PROMPTS + PROMPTS[:1]))
    with pytest.raises(ValueError, match="max_shift"):
        BlipLikelihood(tiny, max_shift=-1)


def test_max_shift_zero_is_deterministic(tiny):
    scorer = BlipLikelihood(tiny, prefix="", max_shift=0)
    x = images()
    assert torch.equal(scorer.shift_crop(x, torch.Generator().manual_seed(0)), x)
    a = scorer.log_likelihood(x, PROMPTS, torch.Generator().manual_seed(0))
    assert torch.equal(a, scorer.log_likelihood(x, PROMPTS, torch.Generator().manual_seed(1)))
    assert torch.equal(a, scorer.log_likelihood(x, PROMPTS))


def test_refuses_images_outside_unit_range(tiny):
    scorer = BlipLikelihood(tiny, prefix="")
    with pytest.raises(ValueError, match=r"BlipLikelihood: expected images in \[0, 1\].*\[-1, 1\] batch"):
        scorer.log_likelihood(images() * 2 - 1, PROMPTS)
    with pytest.raises(ValueError, match="3 images but 2 text"):
        scorer.log_likelihood(images(), PROMPTS[:2])


@pytest.mark.skipif(not (TOY_CAPTIONER / "config.json").exists(),
                    reason="models/toyworld/captioner not committed")
def test_toyworld_captioner_prefers_the_true_colours():
    from t2i_align.toyworld.pretraining.batches import render_batch, to_float
    from t2i_align.toyworld.world import COMPOSITIONAL, place, sample_spec

    rng = random.Random(7)
    scenes, swapped = [], []
    while len(scenes) < 12:
        spec = sample_spec(COMPOSITIONAL, rng, "pair")
        a, b = spec.phrases
        if a.colour is None or b.colour is None or a.colour == b.colour:
            continue
        scenes.append(place(spec, COMPOSITIONAL, rng))
        colours_swapped = (replace(a, colour=b.colour), replace(b, colour=a.colour))
        swapped.append(replace(spec, phrases=colours_swapped).text())
    x = to_float(render_batch(scenes))
    # ToyWorld's captioner was trained on the bare lower-case captions: no prefix
    scorer = BlipLikelihood(str(TOY_CAPTIONER), prefix="", dtype="float32")
    assert scorer.model.dtype == torch.float32
    with torch.no_grad():
        for eps, shift in ((0.0, 0), (0.1, 2)):
            scorer.label_smoothing, scorer.max_shift = eps, shift
            true = scorer.log_likelihood(x, [s.caption for s in scenes], torch.Generator().manual_seed(0))
            wrong = scorer.log_likelihood(x, swapped, torch.Generator().manual_seed(0))
            wins = (true > wrong).float().mean().item()
            assert wins >= 0.75, (eps, shift, wins, true, wrong)
