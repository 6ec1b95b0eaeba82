"""Rewards: values against a reference computation, input checks, and where gradients flow."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor

from t2i_align.rewards import CaptionReward, CLIPReward, Reward, WeightedSum
from tests.helpers import save_tiny_captioner, save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=3)


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    return save_tiny_captioner(tmp_path_factory.mktemp("captioner"), seed=4)


def images(n=3, seed=0, size=64):
    # multiples of 1/255, so the processor's uint8 path sees exactly the same pixels
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed)).float() / 255


PROMPTS = ["a red circle", "two blue squares", "a green star to the left of a yellow triangle"]


def test_clip_reward_is_the_cosine_of_the_processor_pipeline(clip_dir):
    reward = CLIPReward(clip_dir)
    x = images()
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=PROMPTS, images=list((x * 255).round().to(torch.uint8)), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    expected = F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    torch.testing.assert_close(reward(x, PROMPTS), expected, atol=1e-5, rtol=1e-5)


def test_clip_reward_gradient_reaches_the_pixels_and_resizes(clip_dir):
    reward = CLIPReward(clip_dir)
    x = images(size=48).requires_grad_(True)  # not the tower's 64 px: resized inside the graph
    reward(x, PROMPTS).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())


@pytest.mark.parametrize("bad, message", [
    (images() * 2 - 1, "[-1, 1]"),
    ((images() * 255).to(torch.uint8), "float"),
    (images()[:, :1], "B x 3 x H x W"),
])
def test_rewards_reject_images_outside_the_contract(clip_dir, bad, message):
    with pytest.raises(ValueError, match="CLIPReward") as err:
        CLIPReward(clip_dir)(bad, PROMPTS)
    assert message in str(err.value)


def test_rewards_need_one_prompt_per_image(clip_dir):
    with pytest.raises(ValueError, match="3 images but 2 text entries"):
        CLIPReward(clip_dir)(images(), PROMPTS[:2])


def test_caption_reward_exact_form(captioner_dir, clip_dir):
    reward = CaptionReward(captioner_dir, clip_dir)
    x = images()
    captions = reward.captions(x)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    # the prompt that equals the caption scores 1 (cosine of identical embeddings); others as computed
    torch.testing.assert_close(reward(x, captions), torch.ones(3), atol=1e-5, rtol=0)
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        embed = lambda texts: model.get_text_features(**processor.tokenizer(texts, padding=True, return_tensors="pt")).pooler_output  # noqa: E731
        expected = F.cosine_similarity(embed(captions), embed(PROMPTS), dim=-1)
    torch.testing.assert_close(reward(x, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    assert not reward.differentiable
    assert reward(x.clone().requires_grad_(True), PROMPTS).grad_fn is None


def test_differentiable_caption_reward_keeps_the_exact_value_and_has_a_pixel_gradient(captioner_dir, clip_dir):
    exact = CaptionReward(captioner_dir, clip_dir)
    grounded = CaptionReward(captioner_dir, clip_dir, differentiable=True)
    x = images().requires_grad_(True)
    value = grounded(x, PROMPTS)
    torch.testing.assert_close(value.detach(), exact(x.detach(), PROMPTS), atol=1e-6, rtol=0)
    value.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    # the gradient is the grounded cosine's: identical texts give cos = 1 whatever the image, so none
    y = images(seed=1).requires_grad_(True)
    captions = grounded.captions(y.detach())
    grounded(y, captions).sum().backward()
    assert y.grad.abs().max() < 1e-5


def test_prompt_likelihood_surrogate_is_the_captioners_mean_token_log_likelihood(captioner_dir, clip_dir):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from t2i_align.toyworld.experts.captioner import caption_log_likelihood

    exact = CaptionReward(captioner_dir, clip_dir)
    reward = CaptionReward(captioner_dir, clip_dir, differentiable=True, surrogate="prompt_likelihood")
    x = images().requires_grad_(True)
    value = reward(x, PROMPTS)
    torch.testing.assert_close(value.detach(), exact(x.detach(), PROMPTS), atol=1e-6, rtol=0)
    value.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    # g against an independent sum of token log-probs (itself checked against the HF LM loss), per token
    with torch.no_grad():
        g = reward.surrogate_value(images(), PROMPTS, reward.captions(images()))
        model = BlipForConditionalGeneration.from_pretrained(captioner_dir, dtype=torch.float32).eval()
        processor = BlipProcessor.from_pretrained(captioner_dir)
        total = caption_log_likelihood(model, processor, images(), PROMPTS)
    lengths = torch.tensor([len(processor.tokenizer(p).input_ids) - 1 for p in PROMPTS], dtype=total.dtype)
    torch.testing.assert_close(g, total / lengths, atol=1e-4, rtol=1e-4)
    assert (g < 0).all()
    with pytest.raises(ValueError, match="surrogate"):
        CaptionReward(captioner_dir, clip_dir, differentiable=True, surrogate="likelihood")


def test_prompt_likelihood_reward_is_the_captioners_per_image_log_likelihood(captioner_dir):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from t2i_align.experts.captioner import BlipLikelihood
    from t2i_align.rewards import PromptLikelihoodReward
    from t2i_align.toyworld.experts.captioner import caption_log_likelihood

    reward = PromptLikelihoodReward(BlipLikelihood(captioner_dir, prefix="", label_smoothing=0.0, max_shift=0))
    x = images().requires_grad_(True)
    value = reward(x, PROMPTS)
    value.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        model = BlipForConditionalGeneration.from_pretrained(captioner_dir, dtype=torch.float32).eval()
        processor = BlipProcessor.from_pretrained(captioner_dir)
        total = caption_log_likelihood(model, processor, images(), PROMPTS)
    lengths = torch.tensor([len(processor.tokenizer(p).input_ids) - 1 for p in PROMPTS], dtype=total.dtype)
    torch.testing.assert_close(value.detach(), total / lengths, atol=1e-4, rtol=1e-4)


class Constant(Reward):
    differentiable = True

    def __init__(self, value):
        super().__init__()
        self.value = value

    def score(self, images, prompts):
        return images.mean((1, 2, 3)) * 0 + self.value


def test_weighted_sum_combines_named_parts(clip_dir):
    total = WeightedSum({"clip": CLIPReward(clip_dir), "const": Constant(0.5)}, weights={"clip": 2.0})
    x = images()
    parts = total.parts(x, PROMPTS)
    torch.testing.assert_close(total(x, PROMPTS), 2.0 * parts["clip"] + 0.5)
    assert total.differentiable
    with pytest.raises(ValueError, match=r"unknown rewards \['clop'\]"):
        WeightedSum({"clip": Constant(1.0)}, weights={"clop": 1.0})
