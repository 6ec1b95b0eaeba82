"""``TokenCompose``: the denoising loss plus token- and pixel-level grounding of each noun's cross-attention to
its segmentation mask (Wang et al., CVPR 2024, Section 3, Eq. 5-7; the authors' code: mlpc-ucsd/TokenCompose,
train/src/train_token_compose.py, settings in train/train.sh).

    L = L_LDM + sum over the supervised resolutions r of
            (token_weight * sum over the layers l of r of L_token(A_l) + pixel_weight * L_pixel(mean over l of A_l))

* ``A_l``: the head-averaged cross-attention of layer ``l`` in the *same* UNet forward as ``L_LDM``. The token loss
  is taken per layer and summed, the pixel loss once on the layers' mean map (paper Eq. 7; the authors' code:
  train/src/loss_utils.py, ``get_grounding_loss_by_layer``, which groups the layers as mid_8, up_16, up_32, up_64
  for SD1.4 at 512 px).
* ``L_token`` and ``L_pixel``: :func:`~t2i_align.diffusion.attention_losses.token_loss` and ``pixel_loss``, one
  grounding per noun of the pair's ``attn_list`` (all of the noun's CLIP tokens; a noun repeated in the list is
  matched to its next occurrence in the caption); a noun without a mask (``null``) or whose mask is empty at a
  resolution is skipped there.
* Per sample, then the mean over the batch, like ``L_LDM``: a batch of B gives the mean of B single-sample losses,
  so batch 1 x accumulation 4 (the paper, whose public code handles one sample only) and batch 4 train alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from t2i_align.diffusion import attention_losses as al
from t2i_align.diffusion.attention import DEFAULT_LAYER_PREFIXES, AttentionStore, cross_attention_layer_names
from t2i_align.diffusion.tokens import find_phrase
from t2i_align.lightning_modules.base import AlignmentModule, batch_pairs

__all__ = ["TokenCompose", "grounding_losses", "noun_groundings"]


def noun_groundings(caption: str, masks: Sequence[tuple[str, torch.Tensor | None]] | None, tokenizer,
                    where: str = "") -> list[al.Grounding]:
    """One :class:`Grounding` per noun that has a mask and tokens inside the length limit; a noun listed again is
    matched to its next occurrence in ``caption``. A noun missing from the caption is an error naming ``where``."""
    groups, seen = [], {}
    for noun, mask in masks or ():
        occurrence = seen.get(noun.lower(), 0)
        seen[noun.lower()] = occurrence + 1
        try:
            positions = find_phrase(caption, noun, tokenizer, occurrence)
        except ValueError as e:
            raise ValueError(f"TokenCompose: pair {where}: {e}") from e
        if mask is not None and positions:
            groups.append(al.Grounding(positions, mask))
    return groups


def grounding_losses(store: AttentionStore, groundings: Sequence[Sequence[al.Grounding]],
                     resolutions: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_token, L_pixel)`` per sample (``Tensor[B]`` each), summed over the recorded resolutions (all, or
    those in ``resolutions``): at one resolution, L_token is summed over its layers and L_pixel is taken on the
    mean of its layers' maps (see the module docstring)."""
    groups = {r: maps for r, maps in store.by_resolution().items() if resolutions is None or r in resolutions}
    if not groups:
        raise ValueError(f"no recorded cross-attention at resolutions {list(resolutions or [])}; recorded: "
                         f"{sorted(store.by_resolution())}")
    token, pixel = 0.0, 0.0
    masks: dict = {}  # each resolution's masks resized, and their emptiness read on the host, once per batch
    for maps in groups.values():
        # TokenCompose's get_grounding_loss_by_layer: a token loss per layer, the BCE on the layers' mean map
        for layer_maps in maps:
            token = token + al.token_loss(layer_maps, groundings, empty="skip", mask_cache=masks)
        pixel = pixel + al.pixel_loss(torch.stack(maps).mean(0), groundings, empty="skip", mask_cache=masks)
    return token, pixel


class TokenCompose(AlignmentModule):
    """Fine-tuning on image-caption pairs with per-noun masks (TokenCompose's ``metadata.jsonl``), see the module
    docstring.

    Args:
        token_weight: lambda, the weight of L_token (the paper: 1e-3).
        pixel_weight: gamma, the weight of L_pixel (the authors' code: 5e-5, i.e. 5e-2 of lambda).
        layers: cross-attention layers to supervise, as prefixes of their module names (default: the mid block and
            all up blocks, as the paper).
        resolutions: keep only the maps of these spatial sizes (e.g. ``[8, 16, 32, 64]`` for SD1.5 at 512 px;
            default: every size the chosen layers have).
    """

    def __init__(self, *args, token_weight: float = 1e-3, pixel_weight: float = 5e-5,
                 layers: list[str] | None = None, resolutions: list[int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.token_weight, self.pixel_weight = token_weight, pixel_weight
        self.layers = cross_attention_layer_names(self.generator.unet, tuple(layers or DEFAULT_LAYER_PREFIXES))
        self.resolutions = resolutions
        self._capturing = False

    def training_step(self, batch: dict, batch_idx: int):
        pairs = batch_pairs(batch, "TokenCompose")
        if pairs.get("masks") is None:
            raise ValueError("TokenCompose needs per-noun masks: train_pairs must be a metadata.jsonl whose records "
                             "have an \"attn_list\" (configs/data/tokencompose_pairs.yaml)")
        if not self._capturing:
            self.generator.enable_attention_capture(self.layers)
            self._capturing = True
        out = self.generator.denoising_forward(pairs["pixel_values"], pairs["captions"], self.step_rng(),
                                               record_attention=True, caption_dropout=self.caption_dropout)
        tokenizer = self.generator.tokenizer
        # a pair learned with the empty caption (caption_dropout) has no noun tokens to ground
        groundings = [noun_groundings(caption, masks, tokenizer, where=sample_id) if used else []
                      for caption, used, masks, sample_id in zip(pairs["captions"], out.captions, pairs["masks"],
                                                                 pairs["ids"])]
        token, pixel = grounding_losses(out.attention, groundings, self.resolutions)
        loss = out.loss + self.token_weight * token.mean() + self.pixel_weight * pixel.mean()
        logs = {"train/ldm": out.loss.detach(), "train/token": token.detach().mean(), "train/pixel": pixel.detach().mean()}
        return self.finish_step(loss, logs, batch_size=len(pairs["captions"]))
