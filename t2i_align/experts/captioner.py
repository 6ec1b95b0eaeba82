"""Image-to-text likelihood experts: how well does a captioning model read a text off an image?

CoMat's concept-activation loss (Section 4.1, Eq. 2) is ``L_i2t = -log p(prompt | image)`` under a BLIP
captioning model, differentiable in the image. :class:`ImageToText` is the interface:
``log_likelihood(images, texts, rng) -> Tensor[B]``, per text the mean over its label tokens of the
(label-smoothed) token log-likelihood given the image; ``L_i2t = -log_likelihood(...).mean()``.

:class:`BlipLikelihood` follows CoMat's code (CaraJ7/CoMat, ``concept_mat_utils/caption_blip.py``, ``Blip.score``):

* images (float ``B x 3 x H x W`` in [0, 1], refused otherwise) get a random shift crop of 0..``max_shift``
  pixels, then an antialiased bicubic resize to the vision tower's ``image_size`` and the processor's
  mean/std (CLIP's for BLIP) -- never a PIL/uint8 round trip, so the gradient reaches the pixels;
* the text is ``prefix + prompt.lower()`` (``"a photography of "`` for CoMat), tokenized with padding; the
  decoder input starts with BLIP's ``[DEC]`` token (it replaces ``[CLS]``, as in BLIP's training code);
  the labels are the prompt's tokens and the final ``[SEP]`` -- the prefix, ``[DEC]`` and padding are not;
* the token loss is HF's BLIP LM loss: cross-entropy with label smoothing ``eps`` (0.1 in CoMat's
  transformers version), ``(1 - eps) * (-log p(y)) + eps * mean over the vocabulary of (-log p(v))``,
  computed here from the logits (transformers 5 reads ``label_smoothing`` from the text config, default 0).

Batch reduction: CoMat's code takes HF's loss, the mean over *all label tokens of the batch*;
``log_likelihood`` is the mean per text, so ``-log_likelihood(...).mean()`` weights every text equally
(the two agree for a single text or texts of equal length). :meth:`BlipLikelihood.token_log_likelihoods`
gives the per-token values and mask for the token-weighted form.

ToyWorld: the captioner ``models/toyworld/captioner`` was trained on the bare scene captions (no prefix,
lower case, no label smoothing), so ToyWorld uses ``prefix: ""``; ``"photography"`` is not even in its
vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from t2i_align.diffusion.loading import resolve_pretrained
from t2i_align.experts.base import check_images, expert_pixels


@runtime_checkable
class ImageToText(Protocol):
    def log_likelihood(self, images: torch.Tensor, texts: Sequence[str],
                       rng: torch.Generator | None = None) -> torch.Tensor:
        """Per text, the mean (label-smoothed) log-likelihood of its tokens given its image (``Tensor[B]``),
        differentiable in ``images`` (float ``B x 3 x H x W`` in [0, 1]); ``rng`` drives random
        augmentation."""
        ...


class BlipLikelihood(torch.nn.Module):
    """CoMat's image-to-text scorer: a frozen BLIP captioning model's log-likelihood of a prompt.

    Args:
        pretrained: hub id or local folder of a transformers BLIP captioning model
            (``BlipForConditionalGeneration`` + ``BlipProcessor``); CoMat:
            ``Salesforce/blip-image-captioning-large``; ToyWorld: ``models/toyworld/captioner``.
        prefix: text put before every prompt and excluded from the labels (CoMat: ``"a photography of "``;
            ToyWorld: ``""``, its captioner was trained without one). A space is inserted when a non-empty
            prefix does not end in whitespace.
        lowercase: lower-case the prompt (not the prefix) as CoMat does.
        label_smoothing: ``eps`` of the smoothed token loss ``(1 - eps) * NLL + eps * mean over the vocabulary
            of -log p`` (0.1 = HF's BLIP LM loss in CoMat's code; 0 = the plain log-likelihood).
        max_shift: random shift crop: each image is cropped to ``(H - max_shift) x (W - max_shift)`` at its
            own offset drawn uniformly from ``[0, max_shift]^2`` with the call's ``rng`` (the torch default
            generator when ``rng`` is None); 0 = no crop, a deterministic evaluation-style score.
        dtype: precision of the frozen model's weights (``float32``, ``float16``, ``bfloat16``); the token
            log-probabilities are always computed in float32.
    """

    def __init__(self, pretrained: str = "Salesforce/blip-image-captioning-large",
                 prefix: str = "a photography of ", lowercase: bool = True, label_smoothing: float = 0.1,
                 max_shift: int = 2, dtype: str = "float32") -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"BlipLikelihood: label_smoothing must be in [0, 1), got {label_smoothing}")
        if max_shift < 0:
            raise ValueError(f"BlipLikelihood: max_shift must be >= 0, got {max_shift}")
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise ValueError(f"BlipLikelihood: dtype must name a torch float dtype, got {dtype!r}")
        from transformers import BlipForConditionalGeneration, BlipProcessor

        pretrained = resolve_pretrained(pretrained, "captioner")
        self.model = BlipForConditionalGeneration.from_pretrained(pretrained, dtype=torch_dtype)
        self.model.eval().requires_grad_(False)
        self.processor = BlipProcessor.from_pretrained(pretrained)
        self.tokenizer = self.processor.tokenizer
        if prefix and not prefix[-1].isspace():
            prefix = prefix + " "
        self.prefix, self.lowercase = prefix, lowercase
        self.label_smoothing, self.max_shift = float(label_smoothing), int(max_shift)
        ip = self.processor.image_processor
        self.register_buffer("mean", torch.tensor(ip.image_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(ip.image_std, dtype=torch.float32), persistent=False)

    def train(self, mode: bool = True) -> BlipLikelihood:
        super().train(mode)
        self.model.eval()  # frozen expert: dropout stays off whatever the surrounding module does
        return self

    # ------------------------------------------------------------------------------------------- text
    def text(self, prompt: str) -> str:
        """The text the captioner reads: prefix + (lower-cased) prompt."""
        return self.prefix + (prompt.lower() if self.lowercase else prompt)

    def tokens(self, texts: Sequence[str], device: torch.device | str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, label_mask)`` for ``texts`` (prompts, before prefix and
        lower-casing), all ``B x L``.

        ``input_ids``: ``[DEC] prefix prompt [SEP] [PAD]...`` (``[DEC]`` replaces the tokenizer's ``[CLS]``);
        ``label_mask``: True at the tokens that are predicted and scored -- the prompt's tokens and the final
        ``[SEP]`` (a token is a label if it starts at or after the end of the prefix); never ``[DEC]``, a
        prefix token or padding. Token ``k`` is predicted from the logits at position ``k - 1``.
        """
        device = self.mean.device if device is None else device
        enc = self.tokenizer([self.text(t) for t in texts], padding=True, truncation=True,
                             return_tensors="pt", return_offsets_mapping=True,
                             return_special_tokens_mask=True)
        ids, attention = enc.input_ids.clone(), enc.attention_mask
        special = enc.special_tokens_mask.bool()
        starts = enc.offset_mapping[..., 0]
        sep = self.model.config.text_config.sep_token_id
        if sep is None:
            sep = self.tokenizer.sep_token_id
        in_prompt = ~special & (starts >= len(self.prefix))
        label = attention.bool() & (in_prompt | (special & (ids == sep)))
        label[:, 0] = False
        ids[:, 0] = self.model.config.text_config.bos_token_id  # BLIP's decoder starts from [DEC]
        return ids.to(device), attention.to(device), label.to(device)

    # ----------------------------------------------------------------------------------------- images
    def shift_crop(self, images: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        """CoMat's random shift: each image cropped to ``(H - max_shift) x (W - max_shift)`` at an offset
        drawn uniformly from ``[0, max_shift]^2`` (per image, from ``rng`` or the torch default CPU
        generator). Identity when ``max_shift`` is 0."""
        s = self.max_shift
        if s == 0:
            return images
        h, w = images.shape[-2] - s, images.shape[-1] - s
        if h < 1 or w < 1:
            raise ValueError(f"BlipLikelihood: max_shift {s} leaves nothing of "
                             f"{tuple(images.shape[-2:])} images")
        device = rng.device if rng is not None else "cpu"
        offsets = torch.randint(0, s + 1, (len(images), 2), generator=rng, device=device).tolist()
        return torch.stack([image[:, dy:dy + h, dx:dx + w] for image, (dy, dx) in zip(images, offsets)])

    def pixels(self, images: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        """Shift crop, bicubic antialiased resize to the vision tower's size, processor mean/std."""
        size = self.model.config.vision_config.image_size
        images = self.shift_crop(images.to(self.mean.device), rng)
        return expert_pixels(images, size, self.mean, self.std, self.model.dtype)

    # ------------------------------------------------------------------------------------------ score
    def token_log_likelihoods(self, images: torch.Tensor, texts: Sequence[str],
                              rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token label-smoothed log-likelihoods (``-`` the smoothed cross-entropy) of the tokens after
        ``[DEC]`` and their label mask, both ``B x (L - 1)`` (float32; the values are 0 off the mask)."""
        texts = list(texts)
        check_images(images, texts, "BlipLikelihood")
        pixels = self.pixels(images, rng)
        ids, attention, label = self.tokens(texts, pixels.device)
        features = self.model.vision_model(pixel_values=pixels).last_hidden_state
        logits = self.model.text_decoder(input_ids=ids, attention_mask=attention,
                                         encoder_hidden_states=features).logits
        logp = logits[:, :-1].float().log_softmax(-1)
        target = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        eps = self.label_smoothing
        values = (1 - eps) * target + eps * logp.mean(-1) if eps else target
        mask = label[:, 1:]
        return values * mask, mask

    def log_likelihood(self, images: torch.Tensor, texts: Sequence[str],
                       rng: torch.Generator | None = None) -> torch.Tensor:
        """Per text, the mean over its label tokens of the label-smoothed token log-likelihood given the image
        (``Tensor[B]``, float32, differentiable in ``images``)."""
        values, mask = self.token_log_likelihoods(images, texts, rng)
        return values.sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, images: torch.Tensor, texts: Sequence[str],
                rng: torch.Generator | None = None) -> torch.Tensor:
        return self.log_likelihood(images, texts, rng)
