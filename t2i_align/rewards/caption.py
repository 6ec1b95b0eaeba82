"""RealignDiff's caption reward (Eq. 4): caption the image, embed caption and prompt, take the cosine.

Exact form (ranking, evaluation): a BLIP captioner writes a greedy caption; a CLIP text tower embeds
caption and prompt (FineRewards' code uses a CLIP text tower; the paper BLIP-2's text encoder);
``R = cos(T(caption), T(prompt))``. The caption is discrete text, so this score has no gradient.

Differentiable form for ReFL (``differentiable: true``; this project's construction: Eq. 4 as written has no
gradient path, and RealignDiff's Eq. 5 trains on it with ReFL): the caption is still generated
without gradient, then the captioner's own text decoder embeds it *grounded in the image* (its
cross-attention reads the image features, so the embedding depends on the pixels), and the prompt the
same way; ``g = cos(D(caption | image), D(prompt | image))`` (mean-pooled last hidden states). The score
returned is ``R + g - g.detach()``: its value is the exact reward (what ReFL's margin and the logs
see), its gradient is the gradient of ``g``. Both embeddings are grounded because BLIP's decoder is only
ever trained with an image in its cross-attention.

That cosine can be raised by making the image *less* informative (both embeddings fall back to their text
parts): on ToyWorld, ReFL with it shrank the objects while the exact reward stayed flat. The alternative
surrogate ``prompt_likelihood`` takes ``g`` = the captioner's mean token log-likelihood of the prompt given
the image (the prompt's tokens and the final ``[SEP]`` after ``[DEC]``): a smooth relaxation of "the
caption is the prompt", the quantity CoMat's image-to-text loss maximises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2i_align.diffusion.loading import resolve_pretrained
from t2i_align.experts.base import expert_pixels
from t2i_align.rewards.base import Reward
from t2i_align.rewards.clip import _projected


class CaptionReward(Reward):
    """RealignDiff's caption reward: caption the image, compare caption and prompt in CLIP text space.

    Args:
        captioner: hub id or local folder of a transformers BLIP captioning model
            (``BlipForConditionalGeneration`` + ``BlipProcessor``, e.g.
            ``Salesforce/blip-image-captioning-large``; ToyWorld: ``models/toyworld/captioner``).
        text_encoder: hub id or folder of a ``CLIPModel`` whose text tower embeds caption and prompt
            (e.g. ``openai/clip-vit-large-patch14``; ToyWorld: ``models/toyworld/clip``).
        differentiable: add a gradient path (above): ``R + g - g.detach()``.
        surrogate: ``g`` of the differentiable form: ``grounded_cosine`` or ``prompt_likelihood``.
        max_new_tokens: caption length limit (greedy decoding).
        caption_prefix: text the captioner continues (BLIP-large is often prompted with "a picture of");
            it is removed from the caption before embedding.
    """

    SURROGATES = ("grounded_cosine", "prompt_likelihood")

    def __init__(self, captioner: str, text_encoder: str, differentiable: bool = False, max_new_tokens: int = 30,
                 caption_prefix: str = "", surrogate: str = "grounded_cosine") -> None:
        super().__init__()
        if surrogate not in self.SURROGATES:
            raise ValueError(f"CaptionReward: surrogate must be one of {self.SURROGATES}, got {surrogate!r}")
        self.surrogate = surrogate
        from transformers import BlipForConditionalGeneration, BlipProcessor, CLIPModel, CLIPTokenizer

        captioner = resolve_pretrained(captioner, "captioner")
        self.captioner = BlipForConditionalGeneration.from_pretrained(captioner, dtype=torch.float32)
        self.captioner.eval().requires_grad_(False)
        self.processor = BlipProcessor.from_pretrained(captioner)
        text_encoder = resolve_pretrained(text_encoder, "CLIP text encoder")
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

    def decoder_tokens(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        ids[:, 0] = self.captioner.config.text_config.bos_token_id  # BLIP's decoder starts from [DEC]
        return ids, mask

    def grounded_embeddings(self, image_features: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Mean-pooled last hidden states of the captioner's text decoder reading ``texts`` with the image
        features in its cross-attention."""
        ids, mask = self.decoder_tokens(texts, image_features.device)
        hidden = self.captioner.text_decoder.bert(input_ids=ids, attention_mask=mask, is_decoder=True,
                                                  encoder_hidden_states=image_features).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)

    def mean_log_likelihood(self, image_features: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Mean log-probability of each text's tokens (and its final ``[SEP]``) under the captioner, given
        ``[DEC]`` and the image features."""
        ids, mask = self.decoder_tokens(texts, image_features.device)
        logits = self.captioner.text_decoder(input_ids=ids, attention_mask=mask,
                                             encoder_hidden_states=image_features).logits
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        weights = mask[:, 1:].to(logp.dtype)
        return (logp * weights).sum(1) / weights.sum(1)

    def surrogate_value(self, images: torch.Tensor, prompts: list[str], captions: list[str]) -> torch.Tensor:
        """``g`` of the differentiable form (differentiable in ``images``)."""
        features = self.captioner.vision_model(pixel_values=self.pixels(images)).last_hidden_state
        if self.surrogate == "prompt_likelihood":
            return self.mean_log_likelihood(features, prompts)
        return F.cosine_similarity(self.grounded_embeddings(features, captions).float(),
                                   self.grounded_embeddings(features, prompts).float(), dim=-1)

    # ------------------------------------------------------------------------------------ score
    def exact(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
        captions = self.captions(images)
        sim = F.cosine_similarity(self.text_embeddings(captions).float(), self.text_embeddings(prompts).float(), dim=-1)
        return sim, captions

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        reward, captions = self.exact(images, prompts)
        if not (self.differentiable and torch.is_grad_enabled() and images.requires_grad):
            return reward
        g = self.surrogate_value(images, prompts, captions)
        return reward + (g - g.detach())


class PromptLikelihoodReward(Reward):
    """The captioner's mean token log-likelihood of the prompt given the image: CoMat's image-to-text score
    (−L_i2t), as a reward. Ranked against the judge on a model's own samples
    (:class:`~t2i_align.callbacks.reward_agreement.RewardAgreement`), it says whether concept activation trained
    the images to please the captioner rather than to match the prompt.

    Args:
        captioner: an image-to-text scorer (:class:`~t2i_align.experts.captioner.BlipLikelihood`; for a
            deterministic score: ``max_shift: 0``).
    """

    differentiable = True

    def __init__(self, captioner: torch.nn.Module) -> None:
        super().__init__()
        self.captioner = captioner

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.captioner.log_likelihood(images, prompts)
