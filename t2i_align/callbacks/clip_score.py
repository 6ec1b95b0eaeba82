"""CLIP score (Hessel et al., 2021): ``100 * max(cos(image, text), 0)``, torchmetrics' ``CLIPScore``.

torchmetrics >= 1.7 only loads hub ids it knows by name (a local folder without "openai" in its path is
refused), so the model is handed over as a callable that loads any folder or hub id with transformers.
The images are passed as uint8: the CLIP processor rescales by 1/255 itself.

Two adjustments to torchmetrics 1.9: it expects ``get_image_features``/``get_text_features`` to return
tensors, which transformers 5 wraps in a ``BaseModelOutputWithPooling`` (``_TensorFeatures``); and it
clamps the *mean* at 0, where the CLIP score clamps each sample (:class:`PerSampleCLIPScore`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from torchmetrics.multimodal.clip_score import CLIPScore

from t2i_align.callbacks.evaluation import GenerativeEvaluation
from t2i_align.diffusion.loading import resolve_pretrained


class _TensorFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose feature getters return the projected tensors (transformers 4 behaviour)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def load_clip(pretrained: str):
    """``() -> (model, CLIPProcessor)`` for torchmetrics, from a hub id or a local folder."""
    from transformers import CLIPModel, CLIPProcessor

    source = resolve_pretrained(pretrained, "CLIP model")

    def load():
        model = CLIPModel.from_pretrained(source, dtype=torch.float32).eval().requires_grad_(False)
        return _TensorFeatures(model), CLIPProcessor.from_pretrained(source)

    return load


class PerSampleCLIPScore(CLIPScore):
    """``CLIPScore`` with the clamp at 0 per sample, as defined (torchmetrics clamps the mean)."""

    def update(self, source, target) -> None:
        score, n = _clip_score_update(source, target, self.model, self.processor)
        self.score += score.clamp(min=0).sum(0)
        self.n_samples += n


def build_clip_score(pretrained: str) -> CLIPScore:
    return PerSampleCLIPScore(model_name_or_path=load_clip(pretrained))


def backbone_name(pretrained: str) -> str:
    """A short metric-name tag for a CLIP checkpoint: ``openai/clip-vit-large-patch14`` -> ``L14``,
    ``.../clip-vit-base-patch32`` -> ``B32``, otherwise the folder's last component."""
    name = Path(pretrained.rstrip("/")).name.lower()
    for size, tag in (("large", "L"), ("base", "B"), ("huge", "H")):
        if f"vit-{size}-patch" in name:
            return tag + name.split("patch", 1)[1].split("-")[0]
    return name.replace("-", "_")


def clip_score_update(metric: CLIPScore, images: torch.Tensor, prompts: list[str]) -> None:
    """Add float images in [0, 1] (``B x 3 x H x W``) and their prompts to ``metric``."""
    from t2i_align.experts.base import check_images

    check_images(images, prompts, "CLIP score")
    metric.update((images * 255).round().to(torch.uint8), list(prompts))


class CLIPScoreEvaluation(GenerativeEvaluation):
    """Mean CLIP score of the generated evaluation images with their prompts, logged as
    ``clip_<backbone>_x100`` (e.g. ``val/clip_L14_x100``).

    The sampler and prompt arguments are :class:`~t2i_align.callbacks.evaluation.GenerativeEvaluation`'s.

    Args:
        pretrained: CLIP hub id or local folder (``openai/clip-vit-large-patch14``).
        backbone: name in the metric (default from ``pretrained``: ``L14``, ``B32``, or the folder name).
    """

    expert_attributes = ("metric",)  # torchmetrics' CLIPScore holds the CLIP model: moved to the module's device by run()

    def __init__(self, pretrained: str = "openai/clip-vit-large-patch14", backbone: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pretrained = pretrained
        self.name = f"clip_{backbone or backbone_name(pretrained)}_x100"
        self.metric = build_clip_score(pretrained)

    def settings(self) -> dict:
        return {**super().settings(), "pretrained": self.pretrained}

    def reset(self, pl_module) -> None:
        self.metric.to(pl_module.device)
        self.metric.reset()

    def update(self, images: torch.Tensor, items, pl_module) -> None:
        clip_score_update(self.metric, images, [it.prompt for it in items])

    def compute(self, trainer, pl_module) -> dict[str, float]:
        return {self.name: float(self.metric.compute())}
