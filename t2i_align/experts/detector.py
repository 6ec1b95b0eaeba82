"""The open-vocabulary detector interface (MultiGen's and VISOR's object checks) and its transformers OWLv2 build.

A detector says, per image, which of its labels it finds: ``found(images, labels) -> list[list[bool]]`` with
images ``B x 3 x H x W`` in [0, 1] and ``labels[i]`` the category names of image ``i``. ToyWorld answers with its
judge (:class:`t2i_align.toyworld.experts.segmenter.ToyDetector`).
"""

from __future__ import annotations

import json
from typing import Protocol, Sequence, runtime_checkable

import torch

from t2i_align.diffusion.loading import resolve_pretrained
from t2i_align.experts.base import ExpertModule, check_images, expert_pixels


@runtime_checkable
class Detector(Protocol):
    def found(self, images: torch.Tensor, labels: Sequence[Sequence[str]]) -> list[list[bool]]:
        ...


class OwlV2Detector(ExpertModule):
    """transformers ``Owlv2ForObjectDetection`` with one text query per label, ``template.format(label)``.

    A label is found when some predicted box has it as its best-scoring query with a sigmoid score above
    ``threshold`` (the processor's ``post_process_object_detection`` rule; TokenCompose's MultiGen: query "a photo of
    a {c}", threshold 0.1). Images are resized (bicubic, antialiased) to the model's square input without a round trip
    through PIL: generated images are square, so OWLv2's pad-to-square does nothing.

    Args:
        pretrained: hub id or local folder (model, tokenizer and ``preprocessor_config.json``).
        threshold: minimum box score.
        template: query text for a label.
        device: where the model is loaded; frozen and not a child of any LightningModule, it is moved to the module's
            device when fit, validate, test or predict start (:class:`~t2i_align.experts.base.ExpertModule`).
        dtype: weight dtype.
    """

    def __init__(self, pretrained: str = "google/owlv2-base-patch16-ensemble", threshold: float = 0.1,
                 template: str = "a photo of a {}", device: str = "cpu", dtype: str = "float32") -> None:
        super().__init__()
        from transformers import AutoTokenizer, Owlv2ForObjectDetection
        from transformers.utils import cached_file

        pretrained = resolve_pretrained(pretrained, "detector")
        self.model = Owlv2ForObjectDetection.from_pretrained(pretrained, dtype=getattr(torch, dtype))
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        with open(cached_file(pretrained, "preprocessor_config.json")) as f:
            pre = json.load(f)
        self.mean, self.std = pre["image_mean"], pre["image_std"]
        self.threshold, self.template = threshold, template

    @torch.no_grad()
    def found(self, images: torch.Tensor, labels: Sequence[Sequence[str]]) -> list[list[bool]]:
        check_images(images, labels, "OwlV2Detector")
        if len({len(lab) for lab in labels}) > 1:  # one query count per batch: split into single images
            return [row for i in range(len(images)) for row in self.found(images[i:i + 1], labels[i:i + 1])]
        if not labels or not labels[0]:
            return [[] for _ in labels]
        model = self.model
        pixels = expert_pixels(images.to(model.device), model.config.vision_config.image_size, self.mean, self.std,
                               model.dtype)
        queries = [self.template.format(label) for lab in labels for label in lab]
        text = self.tokenizer(queries, padding="max_length", truncation=True,
                              max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
        out = model(input_ids=text.input_ids.to(model.device), attention_mask=text.attention_mask.to(model.device),
                    pixel_values=pixels)
        best = out.logits.float().max(-1)  # per box: its best query
        keep = best.values.sigmoid() > self.threshold
        return [[bool((keep[i] & (best.indices[i] == q)).any()) for q in range(len(lab))]
                for i, lab in enumerate(labels)]
