"""The visual-question-answering expert interface (TIFA's VQA model) and its transformers BLIP build.

A VQA model answers one free-form question per image: ``answer(images, questions) -> list[str]`` with
images ``B x 3 x H x W`` in [0, 1]. TIFA snaps the free-form answer to a multiple-choice option
afterwards (:func:`t2i_align.callbacks.tifa.nearest_choice`). ToyWorld answers with its judge
(:class:`t2i_align.toyworld.experts.vqa.ToyVQA`).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from t2i_align.diffusion.loading import resolve_pretrained
from t2i_align.experts.base import ExpertModule, check_images, expert_pixels


@runtime_checkable
class VQAModel(Protocol):
    def answer(self, images: torch.Tensor, questions: Sequence[str]) -> list[str]:
        ...


class BlipVQA(ExpertModule):
    """transformers ``BlipForQuestionAnswering`` (default ``Salesforce/blip-vqa-base``, TIFA's fast
    option is BLIP VQA as well), greedy answers of at most ``max_new_tokens`` tokens.

    Args:
        pretrained: hub id or local folder (model + ``BlipProcessor``).
        device: where the model is loaded; frozen and not a child of any LightningModule, it is moved to the module's
            device when fit, validate, test or predict start (:class:`~t2i_align.experts.base.ExpertModule`).
        dtype: weight dtype (``float16``/``bfloat16`` on GPUs).
    """

    def __init__(self, pretrained: str = "Salesforce/blip-vqa-base", device: str = "cpu", dtype: str = "float32",
                 max_new_tokens: int = 10) -> None:
        super().__init__()
        from transformers import BlipForQuestionAnswering, BlipProcessor

        pretrained = resolve_pretrained(pretrained, "VQA model")
        self.processor = BlipProcessor.from_pretrained(pretrained)
        self.model = BlipForQuestionAnswering.from_pretrained(pretrained, dtype=getattr(torch, dtype))
        self.model.to(device).eval().requires_grad_(False)
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: Sequence[str]) -> list[str]:
        check_images(images, questions, "BlipVQA")
        model, ip = self.model, self.processor.image_processor
        # the image processor would go through PIL (uint8); resize and normalise the float batch directly
        pixels = expert_pixels(images.to(model.device), model.config.vision_config.image_size, ip.image_mean,
                               ip.image_std, model.dtype)
        text = self.processor.tokenizer(list(questions), padding=True, return_tensors="pt").to(model.device)
        out = model.generate(pixel_values=pixels, input_ids=text.input_ids,
                             attention_mask=text.attention_mask, max_new_tokens=self.max_new_tokens)
        return [a.strip() for a in self.processor.tokenizer.batch_decode(out, skip_special_tokens=True)]
