"""CLIP score through torchmetrics with a local CLIP folder equals 100 * max(cos, 0) computed by hand."""

import torch

from t2i_align.callbacks.clip_score import backbone_name, build_clip_score, clip_score_update
from tests.helpers import save_tiny_clip


def test_local_clip_folder_gives_the_reference_value(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = tmp_path / "my-clip"  # no "openai" in the path: torchmetrics alone would refuse it
    save_tiny_clip(folder)
    model = CLIPModel.from_pretrained(folder).eval()
    images = torch.rand(5, 3, 64, 64)
    prompts = ["a red circle", "a blue square", "two stars", "a green triangle", "a cyan circle"]
    metric = build_clip_score(str(folder))
    clip_score_update(metric, images[:3], prompts[:3])
    clip_score_update(metric, images[3:], prompts[3:])

    processor = CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=list((images * 255).round().to(torch.uint8)), return_tensors="pt")["pixel_values"]
        # independent path: normalise the float images ourselves
        mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
        assert torch.allclose(pixels, ((images * 255).round() / 255 - mean) / std, atol=1e-5)
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(**processor.tokenizer(prompts, padding=True, return_tensors="pt"))
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    cos = torch.nn.functional.cosine_similarity(img, txt)
    expected = (100 * cos.clamp(min=0)).mean()
    assert abs(float(metric.compute()) - float(expected)) < 1e-3


class FixedFeatures(torch.nn.Module):
    """CLIP features chosen by hand: image i is e0; text i is e0 or -e0, so cos is +1 or -1 per sample."""

    def __init__(self, signs: list[float], config) -> None:
        super().__init__()
        self.signs, self.config = torch.tensor(signs), config

    def get_image_features(self, pixel_values):
        return torch.nn.functional.one_hot(torch.zeros(len(pixel_values), dtype=torch.long), 2).float()

    def get_text_features(self, input_ids, attention_mask=None):
        return self.signs[: len(input_ids), None] * torch.tensor([[1.0, 0.0]])


def test_the_clamp_at_zero_is_per_sample(tmp_path):
    # Hessel et al. clamp each sample's cosine at 0; torchmetrics clamps the batch mean. With cos = (+1, -1) the
    # CLIP score is (100 + 0) / 2 = 50, where the clamp of the mean would give max((100 - 100) / 2, 0) = 0.
    folder = tmp_path / "my-clip"
    save_tiny_clip(folder)
    metric = build_clip_score(str(folder))
    metric.model = FixedFeatures([1.0, -1.0], metric.model.config)
    clip_score_update(metric, torch.rand(2, 3, 64, 64), ["a red circle", "a blue square"])
    assert float(metric.compute()) == 50.0


def test_backbone_names():
    assert backbone_name("openai/clip-vit-large-patch14") == "L14"
    assert backbone_name("/models/clip-vit-base-patch32/") == "B32"
    assert backbone_name("models/toyworld/clip") == "clip"
