"""The CLIP image tower as an FID feature module equals CLIPModel's projected image features."""

import torch

from t2i_align.callbacks.fid import build_fid
from t2i_align.experts.clip import CLIPImageFeatures
from tests.helpers import save_tiny_clip


def test_features_match_the_clip_model_and_plug_into_fid(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = save_tiny_clip(tmp_path / "clip")
    features = CLIPImageFeatures(folder)
    images = torch.rand(4, 3, 64, 64)
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    with torch.no_grad():  # 64 px is the tower's size: no resize, only the processor's normalisation
        want = model.get_image_features(pixel_values=(images - mean) / std)
    want = getattr(want, "pooler_output", want)
    torch.testing.assert_close(features(images).float(), want, atol=1e-5, rtol=1e-4)
    assert features(torch.rand(2, 3, 32, 32)).shape == (2, 16)  # other sizes are resized

    fid = build_fid(features)
    assert fid.real_features_sum.numel() == features.num_features == 16
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert abs(float(fid.compute())) < 1e-3  # identical sets
