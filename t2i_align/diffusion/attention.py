"""Cross-attention capture for the chosen ``attn2`` layers of a diffusers UNet.

Only the cross-attention layers that a method asks for get :class:`CaptureProcessor`; every other
layer keeps PyTorch SDPA. When the store is not recording, the capture processor also runs SDPA, so
installing it costs nothing outside the calls that need maps.

Maps are keyed by (step, layer name), never by a running counter: gradient checkpointing re-runs the
forward during backward, and that re-run does not store (``AttentionStore.replay``) (see ``Generator.unet_forward``).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Iterator

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

# Default layers, as in TokenCompose and CoMat (METHODS.md §0): the mid block and all up blocks.
DEFAULT_LAYER_PREFIXES = ("mid_block", "up_blocks")


def cross_attention_layer_names(unet: torch.nn.Module, prefixes: tuple[str, ...] | list[str] = DEFAULT_LAYER_PREFIXES) -> list[str]:
    """Module names of the ``attn2`` (cross-attention) layers whose name starts with one of ``prefixes``."""
    names = [
        name
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and name.endswith("attn2") and name.startswith(tuple(prefixes))
    ]
    if not names:
        raise ValueError(f"no cross-attention (attn2) layer of the UNet starts with any of {list(prefixes)}")
    return names


class AttentionStore:
    """Head-averaged cross-attention probabilities, ``maps[(step, layer)] -> Tensor[B, h, w, T]``.

    The sampler sets ``step``, ``cfg`` (batch is ``[uncond; cond]``: keep the second half) and the
    latent size before each UNet call, and turns ``recording`` on for the calls whose maps it wants.
    """

    def __init__(self) -> None:
        self.maps: dict[tuple[int, str], torch.Tensor] = {}
        self.recording = False
        self.step = 0
        self.cfg = False
        self.latent_hw: tuple[int, int] | None = None
        self._replaying = 0

    def clear(self) -> None:
        self.maps.clear()

    def snapshot(self) -> "AttentionStore":
        """A new store holding the current maps (the live store is cleared by the next sampling call)."""
        copy = AttentionStore()
        copy.maps = dict(self.maps)
        return copy

    @contextlib.contextmanager
    def replay(self, recording: bool) -> Iterator[None]:
        """Context for a checkpoint's backward re-run of a forward made with ``recording``: the re-run must
        take the same (explicit or SDPA) path, but must not overwrite the maps of the real forward."""
        previous = self.recording
        self.recording = recording
        self._replaying += 1
        try:
            yield
        finally:
            self.recording = previous
            self._replaying -= 1

    @contextlib.contextmanager
    def record(self, step: int, cfg: bool, latent_hw: tuple[int, int]) -> Iterator[None]:
        self.recording, self.step, self.cfg, self.latent_hw = True, step, cfg, latent_hw
        try:
            yield
        finally:
            self.recording = False

    def add(self, layer: str, probs: torch.Tensor, heads: int) -> None:
        """Store ``probs`` of shape ``[B*heads, N, T]`` as a head-averaged ``[B', h, w, T]`` map."""
        if self._replaying:
            return
        bh, n, t = probs.shape
        maps = probs.view(bh // heads, heads, n, t).mean(1)
        if self.cfg:
            maps = maps.chunk(2)[1]
        h, w = self._spatial(n)
        self.maps[(self.step, layer)] = maps.reshape(maps.shape[0], h, w, t)

    def _spatial(self, n: int) -> tuple[int, int]:
        if self.latent_hw is None:
            side = math.isqrt(n)
            return side, n // side
        lh, lw = self.latent_hw
        factor = math.isqrt((lh * lw) // n)
        return lh // factor, lw // factor

    @property
    def steps(self) -> list[int]:
        return sorted({step for step, _ in self.maps})

    def layers(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """Maps of one step (default: the last recorded), keyed by layer name."""
        step = self.steps[-1] if step is None else step
        return {layer: m for (s, layer), m in self.maps.items() if s == step}

    def by_resolution(self, step: int | None = None) -> dict[int, list[torch.Tensor]]:
        """Maps of one step grouped by their spatial height (8, 16, 32, 64 for SD1.5 at 512 px)."""
        groups: dict[int, list[torch.Tensor]] = defaultdict(list)
        for m in self.layers(step).values():
            groups[m.shape[1]].append(m)
        return dict(sorted(groups.items()))


class CaptureProcessor:
    """Attention processor that materialises softmax probabilities while its store records."""

    def __init__(self, store: AttentionStore, layer: str) -> None:
        self.store, self.layer = store, layer
        self.sdpa = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if not self.store.recording:
            return self.sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError(f"attention capture supports SD transformer-block cross-attention only ({self.layer})")
        residual = hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch, tokens, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store.add(self.layer, probs, attn.heads)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_capture(unet: torch.nn.Module, layers: list[str], store: AttentionStore) -> None:
    """Give ``layers`` (names from :func:`cross_attention_layer_names`) a capture processor; keep the rest."""
    modules = dict(unet.named_modules())
    for name in layers:
        module = modules.get(name)
        if not isinstance(module, Attention):
            raise ValueError(f"'{name}' is not an attention layer of the UNet")
        module.set_processor(CaptureProcessor(store, name))
