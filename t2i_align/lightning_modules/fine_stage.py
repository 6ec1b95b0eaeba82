"""``FineStage``: RealignDiff's training-free fine semantic re-alignment (Section III-B-2, Eq. 6-10),
an inference-time method. Every image is made twice with the same seed:

1. the first pass: plain sampling with the loaded weights (the base, or a coarse-stage checkpoint: the ReFL
   caption-reward LoRA makes the whole two-stage RealignDiff, ``--ckpt_path``);
2. local dense captions of the first image: the ``tagger`` lists the objects seen (RAM's role), the ``judge`` gives
   each tag a likelihood score s (Eq. 6: certain 2, may 0.5, unlikely 0) and a local description taken from the
   prompt (None when the prompt does not name it), the ``segmenter`` gives each tag its mask (Grounded-SAM's role);
3. the second pass re-weights the attention's pre-softmax scores B = scale * q k^T (Eq. 8-10):

       B' = B + S ⊙ M,   M = λ_t·R⊙(max B − B)⊙W − λ_t·(1−R)⊙(B − min B)⊙W

   with max/min over each query's row, over every query and every key (the negative term covers all of 1 − R: the
   start token, padding, other words, other pixels, queries outside every mask). R[q, k] = 1 where query q lies in
   a tag's mask and key k is one of the tokens of that tag's description (cross-attention) or lies in the same mask
   (self-attention); S[q] = the score of the tag whose mask holds q (Eq. 9; 1 outside every mask); W[q] = 1 − the
   area fraction of the mask holding q (1 outside every mask); where masks overlap, S and W are the later tag's.
   An image with no mask at an attention size (no objects, or all too small there) is not modulated at that size.

What the paper leaves open follows DenseDiffusion (Kim et al., ICCV 2023; naver-ai/DenseDiffusion, gradio_app.py:
``mod_forward`` and ``process_generation``), on which the module is modelled, each a parameter: the conditional
branch of cross- and self-attention in every block is modulated (``attention``, ``layers``) during the first 30 % of
the steps (``step_fraction``) with λ_t = w·(t/1000)^5 (``power``), w = 1 in cross-attention and 0.3 in
self-attention (``cross_strength``, ``self_strength``: its sliders w^c and w^s); every entry outside R is pushed down
(``sim -= ~mask*size_reg*...*(sim - min)``, over all pixels and all 77 tokens); W is its size regularisation
``reg_sizes = 1 - (area of the segment holding the query pixel) / res^2``, one value per query row in both
attentions (small regions are pushed harder). The paper writes this factor as (1 − B) with B = QKᵀ, which is
unbounded and flips sign with the scores: we read it as DenseDiffusion's size term.
A description enters the text condition where it already stands in the prompt (``text_condition="prompt"``: the
judge's descriptions are the prompt's own words; one that cannot be found is left out and counted in
``unlocated``) or appended to it (``"append"``: "<prompt>, <description>, ...", as DenseDiffusion writes a
caption per region; the second pass then samples that text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from t2i_align.diffusion.attention import (
    EditContext, ScoreEdit, cross_attention_layer_names, map_size, self_attention_layer_names,
)
from t2i_align.diffusion.generator import SampleOutput
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.diffusion.tokens import find_phrase
from t2i_align.experts.likelihood import LocalJudge
from t2i_align.experts.segmenter import Segmenter
from t2i_align.experts.tagger import Tagger
from t2i_align.lightning_modules.base import AlignmentModule, FrozenExperts

__all__ = [
    "SCORES",
    "FineStage",
    "LocalObject",
    "Modulation",
    "cross_modulation",
    "modulate",
    "modulate_",
    "self_modulation",
]

SCORES = {"certain": 2.0, "may": 0.5, "unlikely": 0.0}  # Eq. 6
ALL_BLOCKS = ("down_blocks", "mid_block", "up_blocks")


@dataclass(frozen=True)
class LocalObject:
    """One tag of a first-pass image: its likelihood label and score, its local description (None: not in the
    prompt), its mask at image resolution and the token positions of its description in the text condition."""

    tag: str
    label: str
    description: str | None
    mask: torch.Tensor
    positions: tuple[int, ...] = ()

    @property
    def score(self) -> float:
        return SCORES[self.label]


@dataclass(frozen=True)
class Modulation:
    """Eq. 8's operands for one sample at one attention shape ``N x K``: entries where ``positive`` (R) are raised
    towards their row's maximum, every other entry (1 − R) lowered towards its minimum, each by ``weight`` (S ⊙ W,
    ``N x 1``: one value per query) times λ_t of the gap."""

    positive: torch.Tensor
    weight: torch.Tensor


def modulate(scores: torch.Tensor, m: Modulation, lam: float) -> torch.Tensor:
    """Eq. 8 and 10 on pre-softmax scores ``[..., N, K]`` (the max and min of Eq. 10 over each query's row)."""
    hi, lo = scores.amax(-1, keepdim=True), scores.amin(-1, keepdim=True)
    gap = torch.where(m.positive, hi - scores, lo - scores)
    return scores + lam * m.weight.to(scores.dtype) * gap


def modulate_(scores: torch.Tensor, m: Modulation, lam: float) -> torch.Tensor:
    """:func:`modulate` in place on ``scores`` (returned), the same numbers bit for bit with one temporary of the
    scores' size instead of four: ``where(R, hi, lo) - s`` is ``where(R, hi - s, lo - s)`` entry by entry, and
    ``gap * (lam * W)`` is ``(lam * W) * gap`` (a product of two numbers commutes). Not for scores that need a
    gradient (amax/amin keep their input for the backward)."""
    hi, lo = scores.amax(-1, keepdim=True), scores.amin(-1, keepdim=True)
    gap = torch.where(m.positive, hi, lo)
    gap.sub_(scores).mul_(lam * m.weight.to(scores.dtype))
    return scores.add_(gap)


def _region(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The image-resolution mask at an attention size, flattened: cells at least half covered."""
    return (F.interpolate(mask[None, None].float(), size=hw, mode="area")[0, 0] >= 0.5).flatten()


def _regions(objects: Sequence[LocalObject], hw: tuple[int, int]):
    """Each object's region at this size (empty ones left out: an object too small here is not modulated here) and
    the per-query weight S ⊙ W: S (Eq. 9) the score of the tag whose region holds the query, W = 1 − that region's
    area fraction (DenseDiffusion's ``reg_sizes``, per query pixel); both 1 outside every region, the later tag's
    where regions overlap. With no region at all the weight is 0: nothing to re-align at this size."""
    n = hw[0] * hw[1]
    s, w, regions = torch.ones(n), torch.ones(n), []
    for o in objects:
        region = _region(o.mask, hw)
        if region.any():  # o.mask is on the host (local_objects): a branch on a CPU tensor, no device sync
            s[region], w[region] = o.score, 1.0 - region.float().mean()
            regions.append((o, region))
    return regions, (s * w)[:, None] if regions else torch.zeros(n, 1)


def cross_modulation(objects: Sequence[LocalObject], hw: tuple[int, int], tokens: int) -> Modulation:
    """R: a description's tokens for the queries inside its tag's region; every other (query, token) is pushed down."""
    regions, weight = _regions(objects, hw)
    positive = torch.zeros(hw[0] * hw[1], tokens, dtype=torch.bool)
    for o, region in regions:
        keys = torch.zeros(tokens, dtype=torch.bool)
        keys[list(o.positions)] = True
        positive |= region[:, None] & keys[None]
    return Modulation(positive, weight)


def self_modulation(objects: Sequence[LocalObject], hw: tuple[int, int]) -> Modulation:
    """R: pairs of pixels inside the same tag's region; every other (query, key) pair is pushed down."""
    n = hw[0] * hw[1]
    regions, weight = _regions(objects, hw)
    positive = torch.zeros(n, n, dtype=torch.bool)
    for _, region in regions:
        positive |= region[:, None] & region[None, :]
    return Modulation(positive, weight)


class FineStage(AlignmentModule):
    """Two-pass sampling with RealignDiff's re-weighting attention modulation (the module docstring has the rule).
    Trains nothing: use it with ``t2i-align validate`` / ``predict`` and the benchmark exports, on the base weights
    or on a checkpoint of any method whose generator settings it shares (``--ckpt_path``).

    Args:
        tagger: the objects seen in an image (RAM's role).
        judge: per tag, "certain" / "may" / "unlikely" (``judge(prompt, tags)``) and the prompt's words that describe
            it (``judge.describe(prompt, tags)``).
        segmenter: a mask per tag (Grounded-SAM's role).
        attention: which attention is modulated: "cross", "self" or both (DenseDiffusion: both).
        layers: name prefixes of the modulated attention layers (default: every block).
        step_fraction: the share of the sampling steps, from the first, that are modulated (DenseDiffusion: 0.3).
        power: λ_t = strength * (t / num_train_timesteps) ** power, per attention kind (DenseDiffusion: 5).
        cross_strength: the strength of λ_t in cross-attention (DenseDiffusion's w^c: 1).
        self_strength: the strength of λ_t in self-attention (DenseDiffusion's w^s: 0.3).
        text_condition: "prompt" (descriptions are located in the prompt) or "append" (added to it).
    """

    def __init__(
        self,
        *args,
        tagger: Tagger,
        judge: LocalJudge,
        segmenter: Segmenter,
        attention: Sequence[Literal["cross", "self"]] = ("cross", "self"),
        layers: Sequence[str] = ALL_BLOCKS,
        step_fraction: float = 0.3,
        power: float = 5.0,
        cross_strength: float = 1.0,
        self_strength: float = 0.3,
        text_condition: Literal["prompt", "append"] = "prompt",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not set(attention) <= {"cross", "self"} or not attention:
            raise ValueError(f"attention must name 'cross' and/or 'self', got {list(attention)}")
        if not 0.0 <= step_fraction <= 1.0:
            raise ValueError(f"step_fraction must be in [0, 1], got {step_fraction}")
        if text_condition not in ("prompt", "append"):
            raise ValueError(f"text_condition must be 'prompt' or 'append', got {text_condition!r}")
        self.experts = FrozenExperts(tagger=tagger, judge=judge, segmenter=segmenter)
        self.attention, self.layer_prefixes = tuple(attention), tuple(layers)
        self.step_fraction, self.power = step_fraction, power
        self.cross_strength, self.self_strength = cross_strength, self_strength
        self.text_condition = text_condition
        self.unlocated = 0  # descriptions not found in the prompt (text_condition="prompt")
        self.last_objects: list[list[LocalObject]] = []  # the local captions of the last sample() call

    def configure_optimizers(self):
        raise RuntimeError("FineStage is training-free: run it with `t2i-align validate` or `predict`, not fit")

    def training_step(self, batch, batch_idx):
        raise RuntimeError("FineStage is training-free: run it with `t2i-align validate` or `predict`, not fit")

    # ------------------------------------------------------------------------------ local dense captions
    def local_objects(self, prompts: Sequence[str], images: torch.Tensor) -> tuple[list[str], list[list[LocalObject]]]:
        """The text condition of the second pass and the tagged objects of each first-pass image."""
        tags = self.experts["tagger"].tags(images)
        masks = self.experts["segmenter"].masks(images, tags)
        judge, texts, out = self.experts["judge"], [], []
        for prompt, image_tags, image_masks in zip(prompts, tags, masks):
            labels = judge(prompt, image_tags) if image_tags else []
            descriptions = judge.describe(prompt, image_tags) if image_tags else []
            text = prompt
            if self.text_condition == "append":
                text = ", ".join([prompt, *dict.fromkeys(d for d in descriptions if d)])
            # the image's masks to the host in one copy (a blocking copy, a sync on a GPU, per image, not per tag)
            if torch.is_tensor(image_masks):  # the Segmenter contract: len(tags) x H x W
                host_masks = list(image_masks.cpu())
            else:
                host_masks = list(torch.stack(list(image_masks)).cpu()) if len(image_masks) else []
            objects = [LocalObject(t, label, d, m, self._positions(text, d))
                       for t, label, d, m in zip(image_tags, labels, descriptions, host_masks)]
            texts.append(text)
            out.append(objects)
        return texts, out

    def _positions(self, text: str, description: str | None) -> tuple[int, ...]:
        if not description:
            return ()
        # appended: the description's last occurrence (the appended one); else its first in the prompt
        found = []
        while not found or self.text_condition == "append":
            try:
                found.append(find_phrase(text, description, self.generator.tokenizer, len(found)))
            except ValueError:
                break
        if not found:
            self.unlocated += 1
            return ()
        return found[-1]

    # ------------------------------------------------------------------------------ modulation
    def modulation_edits(self, objects: Sequence[Sequence[LocalObject]], sampling: SamplingSettings) -> list[ScoreEdit]:
        """One :class:`ScoreEdit` over the modulated layers and the first steps (none when no image has an object:
        the second pass is then the first)."""
        n = sampling.num_inference_steps
        total = self.generator.train_scheduler.config.num_train_timesteps
        steps = set(range(min(n, math.ceil(self.step_fraction * n - 1e-9))))
        cache: dict[tuple, list[Modulation]] = {}  # built once per attention shape, on the scores' device
        latent_side = (sampling.resolution or self.generator.default_resolution) // self.generator.vae_scale_factor

        def edit(scores: torch.Tensor, ctx: EditContext) -> torch.Tensor:
            kind = "cross" if ctx.layer.endswith("attn2") else "self"
            bh, queries, keys = scores.shape
            hw = map_size(ctx.latent_hw or (latent_side, latent_side), queries)
            key = (kind, queries, keys, scores.device)
            if key not in cache:
                cache[key] = [_to(cross_modulation(o, hw, keys) if kind == "cross" else self_modulation(o, hw),
                                  scores.device) for o in objects]
            per_sample = scores.view(bh // ctx.heads, ctx.heads, queries, keys)
            cond = per_sample.chunk(2)[1] if ctx.cfg else per_sample  # the conditional branch (DenseDiffusion)
            strength = self.cross_strength if kind == "cross" else self.self_strength
            lam = strength * (ctx.timestep / total) ** self.power
            if not (scores.requires_grad and torch.is_grad_enabled()):
                # In place, one sample at a time: the extra memory is one sample's heads x N x K (one temporary)
                # instead of the conditional half stacked and the whole batch concatenated: at SD1.5's 64 x 64
                # self-attention, batch 8 with CFG, fp32, 0.5 GiB instead of 12 GiB above the scores
                # (experiments/benchmarks/fine_stage_memory.py). The same numbers bit for bit.
                for c, m in zip(cond, cache[key]):
                    modulate_(c, m, lam)
                return scores
            edited = torch.stack([modulate(c, m, lam) for c, m in zip(cond, cache[key])])
            if ctx.cfg:
                edited = torch.cat([per_sample.chunk(2)[0], edited])
            return edited.view(bh, queries, keys)

        unet = self.generator.unet
        names = []
        if "cross" in self.attention:
            names += cross_attention_layer_names(unet, self.layer_prefixes)
        if "self" in self.attention:
            names += self_attention_layer_names(unet, self.layer_prefixes)
        return [ScoreEdit(edit, names, steps)] if steps and any(objects) else []

    # ------------------------------------------------------------------------------ sampling
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], sampling: SamplingSettings | None = None,
               **kwargs) -> SampleOutput:
        """The first pass, its local dense captions, and the second pass from the same seeds."""
        sampling = sampling or SamplingSettings()
        first = self.generator.sample(prompts, seeds, sampling, **{**kwargs, "decode": True})
        texts, objects = self.local_objects(prompts, first.images.float())
        self.last_objects = objects
        edits = [*kwargs.pop("attention_edits", ()), *self.modulation_edits(objects, sampling)]
        return self.generator.sample(texts, seeds, sampling, attention_edits=edits, **kwargs)


def _to(m: Modulation, device: torch.device) -> Modulation:
    return Modulation(m.positive.to(device), m.weight.to(device))
