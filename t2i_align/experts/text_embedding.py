"""Sentence embeddings (TIFA snaps free-form VQA answers to the nearest choice with SBERT).

:class:`SentenceEmbedder` follows the sentence-transformers recipe of ``all-mpnet-base-v2``: token
states of a transformers encoder, mean-pooled over the attention mask, L2-normalised.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from t2i_align.diffusion.loading import resolve_pretrained
from t2i_align.experts.base import ExpertModule

Embedder = Callable[[Sequence[str]], torch.Tensor]  # texts -> N x D (normalised rows)


class SentenceEmbedder(ExpertModule):
    """Args:
        pretrained: hub id or local folder with an ``AutoModel`` encoder and its tokenizer.
        device: where the encoder is loaded; whoever holds it (TIFA's callback) moves it to the module's device
            with ``.to(device)`` (:class:`~t2i_align.experts.base.ExpertModule`).
    """

    def __init__(self, pretrained: str = "sentence-transformers/all-mpnet-base-v2", device: str = "cpu") -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        pretrained = resolve_pretrained(pretrained, "text embedding model")
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        self.model = AutoModel.from_pretrained(pretrained, dtype=torch.float32).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        states = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)
