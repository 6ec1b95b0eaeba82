"""RealignDiff's caption reward (Eq. 4): caption the image, embed caption and prompt, take the cosine.

Exact form (ranking, evaluation): a BLIP captioner writes a greedy caption; a CLIP text tower embeds
caption and prompt (FineRewards' code uses a CLIP text tower; the paper BLIP-2's text encoder);
``R = cos(T(caption), T(prompt))``. The caption is discrete text, so this score has no gradient.

Differentiable form for ReFL (``differentiable: true``; METHODS.md §1): the caption is still generated
without gradient, then the captioner's own text decoder embeds it *grounded in the image* (its
cross-attention reads the image features, so the embedding depends on the pixels), and the prompt the
same way; ``g = cos(D(caption | image), D(prompt | image))`` (mean-pooled last hidden states). The score
returned is ``R + g - g.detach()``: its value is the exact reward (what ReFL's margin and the logs
see), its gradient is the gradient of ``g``. Both embeddings are grounded because BLIP's decoder is only
ever trained with an image in its cross-attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2i_align.experts.base import expert_pixels
from t2i_align.rewards.base import Reward
from t2i_align.rewards.clip import _projected


class CaptionReward(Reward):
    """Args:
        captioner: hub id or local folder of a transformers BLIP captioning model
            (``BlipForConditionalGeneration`` + ``BlipProcessor``, e.g.
            ``Salesforce/blip-image-captioning-large``; ToyWorld: ``models/toyworld/captioner``).
        text_encoder: hub id or folder of a ``CLIPModel`` whose text tower embeds caption and prompt
            (e.g. ``openai/clip-vit-large-patch14``; ToyWorld: ``models/toyworld/clip``).
        differentiable: add the grounded-embedding gradient path described above.
        max_new_tokens: caption length limit (greedy decoding).
        caption_prefix: text the captioner continues (BLIP-large is often prompted with "a picture of");
            it is removed from the caption before embedding.
    """

    def __init__(self, captioner: str, text_encoder: str, differentiable: bool = False, max_new_tokens: int = 30,
                 caption_prefix: str = "") -> None:
        super().__init__()
        from transformers import BlipForConditionalGeneration, BlipProcessor, CLIPModel, CLIPTokenizer

        self.captioner = BlipForConditionalGeneration.from_pretrained(captioner, dtype=torch.float32)
        self.captioner.eval().requires_grad_(False)
        self.processor = BlipProcessor.from_pretrained(captioner)
        clip = CLIPModel.from_pretrained(text_encoder, dtype=torch.float32)
        # only the text tower is kept
        self.text_model, self.text_projection = clip.text_model.eval(), clip.text_projection.eval()
        self.text_model.requires_grad_(False), self.text_projection.requires_grad_(False)
        self.text_tokenizer = CLIPTokenizer.from_pretrained(text_encoder)
        self.differentiable = differentiable
        self.max_new_tokens = max_new_tokens
        self.caption_prefix = caption_prefix.strip()
        ip = self.processor.image_processor
        self.register_buffer("mean", torch.tensor(ip.image_mean), persistent=False)
        self.register_buffer("std", torch.tensor(ip.image_std), persistent=False)

    # ------------------------------------------------------------------------------------ parts
    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        size = self.captioner.config.vision_config.image_size
        return expert_pixels(images, size, self.mean, self.std, self.captioner.dtype)

    @torch.no_grad()
    def captions(self, images: torch.Tensor) -> list[str]:
        """Greedy captions of float images in [0, 1] (prefix removed)."""
        kwargs = {}
        if self.caption_prefix:
            tokens = self.processor.tokenizer([self.caption_prefix] * len(images), return_tensors="pt")
            kwargs = dict(input_ids=tokens.input_ids[:, :-1].to(self.mean.device))  # without the final [SEP]
        out = self.captioner.generate(pixel_values=self.pixels(images), max_new_tokens=self.max_new_tokens,
                                      num_beams=1, do_sample=False, **kwargs)
        texts = [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]
        prefix = self.caption_prefix.lower()
        return [t[len(prefix):].strip() if prefix and t.lower().startswith(prefix) else t for t in texts]

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        tokens = self.text_tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.mean.device)
        return self.text_projection(_projected(self.text_model(**tokens)))

    def grounded_embeddings(self, image_features: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Mean-pooled last hidden states of the captioner's text decoder reading ``texts`` with the image
        features in its cross-attention."""
        tokens = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(image_features.device), tokens.attention_mask.to(image_features.device)
        ids[:, 0] = self.captioner.config.text_config.bos_token_id  # BLIP's decoder starts from [DEC]
        hidden = self.captioner.text_decoder.bert(input_ids=ids, attention_mask=mask, is_decoder=True,
                                                  encoder_hidden_states=image_features).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)

    # ------------------------------------------------------------------------------------ score
    def exact(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
        captions = self.captions(images)
        sim = F.cosine_similarity(self.text_embeddings(captions).float(), self.text_embeddings(prompts).float(), dim=-1)
        return sim, captions

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        reward, captions = self.exact(images, prompts)
        if not (self.differentiable and torch.is_grad_enabled() and images.requires_grad):
            return reward
        features = self.captioner.vision_model(pixel_values=self.pixels(images)).last_hidden_state
        g = F.cosine_similarity(self.grounded_embeddings(features, captions).float(),
                                self.grounded_embeddings(features, prompts).float(), dim=-1)
        return reward + (g - g.detach())
