"""Attention capture and editing for chosen layers of a diffusers UNet, keyed by layer name.

Only the layers that a method asks for get :class:`CaptureProcessor` (cross-attention ``attn2`` by default,
self-attention ``attn1`` when named); every other layer keeps PyTorch SDPA. A processor materialises the
attention only when its store records or an :class:`ScoreEdit` applies to its layer at the current step;
otherwise it runs SDPA too, so installing it costs nothing outside the calls that need it. An edit changes
the pre-softmax scores (``scale * q k^T`` plus the mask) and capture sees the edited probabilities.

Maps are keyed by (step, layer name), never by a running counter: gradient checkpointing re-runs the
forward during backward, and that re-run does not store (``AttentionStore.replay``) (see ``Generator.unet_forward``).

A sampling chain's text condition is the same tensor at every step, so on its steps without gradient the
cross-attention keys and values are computed once (:func:`key_value_cache`, :class:`KeyValueCache`).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Container, Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

# Default layers: the mid block and all up blocks, as in TokenCompose (Section 4, "Setup": every cross-attention
# layer of U_Mid and U_D) and CoMat (Appendix E.1, "Training Layers for Attribute Concentration").
DEFAULT_LAYER_PREFIXES = ("mid_block", "up_blocks")


def layer_downsampling(unet: torch.nn.Module, name: str) -> int:
    """How many times the latents are downsampled where the layer ``name`` of a diffusers ``UNet2DConditionModel``
    runs (its map side is the latent side divided by this): ``down_blocks.i`` at 2**i (a block downsamples at its
    end), the mid block at the deepest level, ``up_blocks.j`` at 2**(levels - 1 - j) (a block upsamples at its end).
    SD1.5 at 512 px: 1, 2, 4, 8 for maps of 64, 32, 16, 8; SDXL at 1024 px: 1, 2, 4 (128, 64, 32), the cross-attention
    at 2 and 4 only, in transformer blocks of 2 and 10 layers."""
    levels = len(unet.config.block_out_channels)
    head, _, rest = name.partition(".")
    if head == "mid_block":
        return 2 ** (levels - 1)
    if head in ("down_blocks", "up_blocks"):
        index = int(rest.split(".", 1)[0])
        return 2 ** index if head == "down_blocks" else 2 ** (levels - 1 - index)
    raise ValueError(f"'{name}' is not in a down, mid or up block of the UNet")


def _attention_layer_names(unet: torch.nn.Module, suffix: str, prefixes, downsampling) -> list[str]:
    names = [name for name, module in unet.named_modules()
             if isinstance(module, Attention) and name.endswith(suffix) and name.startswith(tuple(prefixes))]
    if downsampling is not None:
        names = [name for name in names if layer_downsampling(unet, name) in set(downsampling)]
    return names


def cross_attention_layer_names(unet: torch.nn.Module, prefixes: tuple[str, ...] | list[str] = DEFAULT_LAYER_PREFIXES,
                                downsampling: Sequence[int] | None = None) -> list[str]:
    """Module names of the ``attn2`` (cross-attention) layers whose name starts with one of ``prefixes``: every
    transformer layer of every block (``...attentions.k.transformer_blocks.d.attn2``, d < the block's
    ``transformer_layers_per_block``: SDXL's blocks hold 2 or 10). ``downsampling``: only layers at these factors
    (:func:`layer_downsampling`), e.g. ``[4]`` for SDXL's 32 x 32 maps at 1024 px."""
    names = _attention_layer_names(unet, "attn2", prefixes, downsampling)
    if not names:
        at = "" if downsampling is None else f" at downsampling {list(downsampling)}"
        raise ValueError(f"no cross-attention (attn2) layer of the UNet starts with any of {list(prefixes)}{at}")
    return names


@dataclass(frozen=True)
class EditContext:
    """Where an edit is applied: ``step`` is the sampler's step index and ``timestep`` its diffusion timestep t
    (for schedules like lambda_t); ``cfg`` means the batch is ``[uncond; cond]`` (edit ``chunk(2)[1]`` to change
    the conditional branch only); ``latent_hw`` is the latent size of the call (map side = latent side / factor)."""

    layer: str
    step: int
    timestep: int
    heads: int
    cfg: bool
    latent_hw: tuple[int, int] | None


@dataclass(frozen=True)
class ScoreEdit:
    """Change the pre-softmax attention scores of ``layers`` at the sampling ``steps`` (None: every step).

    ``fn(scores, context) -> scores`` receives ``[B * heads, N, T]`` scores (``T`` tokens for cross-attention,
    ``N`` for self-attention) and an :class:`EditContext`; it returns scores of the same shape. The scores are the
    processor's own (no one else holds them): ``fn`` may change them in place and return them, which at 64 x 64
    self-attention saves a copy of the batch's scores (FineStage does when they need no gradient).
    """

    fn: Callable[[torch.Tensor, EditContext], torch.Tensor]
    layers: Sequence[str]
    steps: Container[int] | None = None

    def applies(self, layer: str, step: int) -> bool:
        return layer in self.layers and (self.steps is None or step in self.steps)


class AttentionStore:
    """Head-averaged cross-attention probabilities, ``maps[(step, layer)] -> Tensor[B, h, w, T]``.

    The sampler sets ``step``, ``cfg`` (batch is ``[uncond; cond]``: keep the second half) and the
    latent size before each UNet call, and turns ``recording`` on for the calls whose maps it wants.
    """

    def __init__(self) -> None:
        self.maps: dict[tuple[int, str], torch.Tensor] = {}
        self.recording = False
        self.step = 0
        self.timestep = 0
        self.cfg = False
        self.latent_hw: tuple[int, int] | None = None
        self.edits: tuple[ScoreEdit, ...] = ()  # set by the sampler for one call
        self._replaying = 0

    def edits_for(self, layer: str) -> list[ScoreEdit]:
        return [e for e in self.edits if e.applies(layer, self.step)]

    @contextlib.contextmanager
    def at_step(self, step: int, timestep: int, cfg: bool, latent_hw: tuple[int, int], recording: bool) -> Iterator[None]:
        """Context of one UNet call of the sampler: its step index (for edits and map keys) and timestep (for
        edits), CFG layout and size."""
        self.step, self.timestep, self.cfg, self.latent_hw, self.recording = step, timestep, cfg, latent_hw, recording
        try:
            yield
        finally:
            self.recording = False

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
        return map_size(self.latent_hw, n)

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


def map_size(latent_hw: tuple[int, int] | None, n: int) -> tuple[int, int]:
    """``(h, w)`` of an attention map with ``n`` queries in a UNet call on latents of ``latent_hw`` (square when
    unknown)."""
    if latent_hw is None:
        side = math.isqrt(n)
        return side, n // side
    lh, lw = latent_hw
    factor = math.isqrt((lh * lw) // n)
    return lh // factor, lw // factor


class CaptureProcessor:
    """Attention processor that materialises the softmax probabilities while its store records or an edit
    applies (then it computes scores, edits, softmax, stores, as diffusers' ``get_attention_scores``)."""

    def __init__(self, store: AttentionStore, layer: str) -> None:
        self.store, self.layer = store, layer
        self.sdpa = AttnProcessor2_0()
        self.cache: KeyValueCache | None = None  # set by key_value_cache() for one sampling chain

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        edits = self.store.edits_for(self.layer)
        if not self.store.recording and not edits:
            return cached_sdpa(self.cache, self.sdpa, attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                               **kwargs)
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError(f"attention capture supports SD transformer-block attention only ({self.layer})")
        residual = hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch, tokens, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = scores_to_probs(attn, query, key, attention_mask, edits, self._context(attn))
        if self.store.recording:
            self.store.add(self.layer, probs, attn.heads)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


    def _context(self, attn: Attention) -> EditContext:
        store = self.store
        return EditContext(self.layer, store.step, store.timestep, attn.heads, store.cfg, store.latent_hw)


def scores_to_probs(attn: Attention, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                    edits: Sequence[ScoreEdit], context: EditContext) -> torch.Tensor:
    """``softmax(edit(scale * q k^T + mask))`` with diffusers' upcasting rules (``Attention.get_attention_scores``
    computes the same without the edit)."""
    dtype = query.dtype
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    if mask is None:
        # beta = 0: the GEMM overwrites, the input is never read (diffusers passes a full-size torch.empty here, one
        # more batch x N x K tensor alive through the call: 8 GiB at SD1.5's 64 x 64 self-attention, batch 8 + CFG).
        # One element broadcast to the output's shape is the same call, bit for bit, without that allocation.
        shape = (query.shape[0], query.shape[1], key.shape[1])
        base, beta = torch.empty(1, 1, 1, dtype=query.dtype, device=query.device).expand(shape), 0
    else:
        base, beta = mask, 1
    scores = torch.baddbmm(base, query, key.transpose(-1, -2), beta=beta, alpha=attn.scale)
    if attn.upcast_softmax:
        scores = scores.float()
    for edit in edits:
        scores = edit.fn(scores, context)
    return scores.softmax(dim=-1).to(dtype)


def self_attention_layer_names(unet: torch.nn.Module, prefixes: tuple[str, ...] | list[str] = DEFAULT_LAYER_PREFIXES,
                               downsampling: Sequence[int] | None = None) -> list[str]:
    """Module names of the ``attn1`` (self-attention) layers whose name starts with one of ``prefixes`` (every
    transformer depth; ``downsampling`` as in :func:`cross_attention_layer_names`)."""
    return _attention_layer_names(unet, "attn1", prefixes, downsampling)


def install_capture(unet: torch.nn.Module, layers: list[str], store: AttentionStore) -> None:
    """Give ``layers`` (cross- or self-attention layer names) a capture processor; keep the rest."""
    modules = dict(unet.named_modules())
    for name in layers:
        module = modules.get(name)
        if not isinstance(module, Attention):
            raise ValueError(f"'{name}' is not an attention layer of the UNet")
        module.set_processor(CaptureProcessor(store, name))


# ---------------------------------------------------------------------------------------- key/value cache
class KeyValueCache:
    """Cross-attention keys and values of one sampling chain, computed at the first UNet call that may use them and
    reused by the later ones: the condition (prompt embeddings) is the same tensor at every step and the weights do
    not change within a chain.

    The sampler turns :attr:`active` on for its steps without gradient only: at a grad step the keys and values
    must carry gradient (LoRA on ``to_k``/``to_v``), and a no-grad step may run merged LoRA weights
    (:class:`~t2i_align.diffusion.lora.PlainLayers`) which the grad steps do not. An entry is reused only for the
    very tensor it was computed from (identity), so a call with another condition computes its own.
    """

    def __init__(self) -> None:
        self.active = False
        # (layer, id(condition)) -> (condition, key, value); the condition is held, so its id stays its own
        self._entries: dict[tuple[Attention, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.hits = 0

    def clear(self) -> None:
        self._entries.clear()

    def key_value(self, attn: Attention, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key, value)`` of ``attn`` for ``context``, each ``[B, heads, T, head_dim]`` (as diffusers' SDPA
        processor shapes them)."""
        entry = self._entries.get((attn, id(context)))
        if entry is not None and entry[0] is context:
            self.hits += 1
            return entry[1], entry[2]
        batch = context.shape[0]
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        self._entries[(attn, id(context))] = (context, key, value)
        return key, value


def cached_sdpa(cache: KeyValueCache | None, fallback: AttnProcessor2_0, attn: Attention, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """diffusers' ``AttnProcessor2_0`` with the keys and values from ``cache`` while it is active: the same
    operations on the same tensors (bit-identical output). Calls the cache does not cover (self-attention, masks,
    normalised or spatial attention, 4-d inputs) go to ``fallback``."""
    if (cache is None or not cache.active or encoder_hidden_states is None or attention_mask is not None or kwargs
            or hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None
            or attn.norm_cross or attn.norm_q is not None or attn.norm_k is not None):
        return fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
    residual = hidden_states
    batch = encoder_hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    key, value = cache.key_value(attn, encoder_hidden_states)
    head_dim = key.shape[-1]
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class CachedAttnProcessor:
    """``AttnProcessor2_0`` with cross-attention keys and values from a :class:`KeyValueCache` (see
    :func:`cached_sdpa`); installed by :func:`key_value_cache` for one sampling chain."""

    def __init__(self, cache: KeyValueCache) -> None:
        self.cache = cache
        self.sdpa = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return cached_sdpa(self.cache, self.sdpa, attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                           **kwargs)


@contextlib.contextmanager
def key_value_cache(unet: torch.nn.Module) -> Iterator[KeyValueCache]:
    """A :class:`KeyValueCache` (inactive until the caller turns it on) used by every cross-attention layer of
    ``unet`` that runs diffusers' SDPA processor or a :class:`CaptureProcessor`; other processors are left alone.
    Every layer has its own processor back afterwards and the cache is emptied."""
    cache = KeyValueCache()
    replaced: list[tuple[Attention, object]] = []
    captures: list[CaptureProcessor] = []
    for module in unet.modules():
        if not isinstance(module, Attention) or not module.is_cross_attention:
            continue
        processor = module.processor
        if type(processor) is AttnProcessor2_0:
            replaced.append((module, processor))
            module.processor = CachedAttnProcessor(cache)
        elif isinstance(processor, CaptureProcessor) and processor.cache is None:
            captures.append(processor)
            processor.cache = cache
    try:
        yield cache
    finally:
        for module, processor in replaced:
            module.processor = processor
        for processor in captures:
            processor.cache = None
        cache.clear()
