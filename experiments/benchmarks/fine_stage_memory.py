"""Peak memory of FineStage's edited self-attention at SD1.5's 64 x 64 maps (issue 27), before and after the
in-place, per-sample edit (``fine_stage.modulate_``).

    python experiments/benchmarks/fine_stage_memory.py                    # 4096 queries, batch 8, CFG, 8 heads x 40
    python experiments/benchmarks/fine_stage_memory.py --batch 2 --side 16 --json out.json

No model and no memory needed: the attention runs on PyTorch's ``meta`` device (shapes only) under a dispatch mode
that adds up the bytes of every storage an operation creates and subtracts them when the storage is freed (a weakref
on it), i.e. the bytes a device allocator would hand out, without its rounding or caching. Measured: one call of
``attention.scores_to_probs`` (``softmax(edit(scale * q k^T))``, the path a CaptureProcessor takes when an edit
applies) with the query and key of the first down block's self-attention (CFG doubles the batch), its peak above
what was live before (the inputs and the edit's cached masks): without an edit, with the edit as it was (stacked
and concatenated out-of-place modulation, :func:`old_edit`), and with the edit as it is.
"""

from __future__ import annotations

import argparse
import json
import weakref
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from t2i_align.diffusion.attention import EditContext, scores_to_probs
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.lightning_modules import fine_stage as fs


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside (and still alive), and their peak."""

    def __init__(self, existing: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.now = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._existing = {t.untyped_storage()._cdata for t in existing}  # views of these are not new memory

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes or key in self._existing:  # a view or an in-place result: no new memory
            return
        self._sizes[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def old_edit(scores: torch.Tensor, ctx: EditContext, modulations: list[fs.Modulation], lam: float) -> torch.Tensor:
    """FineStage's edit before issue 27 (per sample out of place, then stacked, then concatenated with the
    unconditional half): the reference for the numbers and the memory."""
    bh, queries, keys = scores.shape
    per_sample = scores.view(bh // ctx.heads, ctx.heads, queries, keys)
    cond = per_sample.chunk(2)[1] if ctx.cfg else per_sample
    edited = torch.stack([fs.modulate(c, m, lam) for c, m in zip(cond, modulations)])
    if ctx.cfg:
        edited = torch.cat([per_sample.chunk(2)[0], edited])
    return edited.view(bh, queries, keys)


def random_objects(batch: int, image: int, per_image: int, seed: int = 0) -> list[list[fs.LocalObject]]:
    """``per_image`` random rectangles per image (scores from Eq. 6's labels)."""
    g = torch.Generator().manual_seed(seed)
    labels = list(fs.SCORES)
    out = []
    for _ in range(batch):
        objects = []
        for k in range(per_image):
            y0, x0 = torch.randint(0, image // 2, (2,), generator=g).tolist()
            h, w = torch.randint(image // 8, image // 2, (2,), generator=g).tolist()
            mask = torch.zeros(image, image, dtype=torch.bool)
            mask[y0:y0 + h, x0:x0 + w] = True
            objects.append(fs.LocalObject(f"tag{k}", labels[k % len(labels)], f"tag{k}", mask, (1 + k,)))
        out.append(objects)
    return out


def self_edit(objects, side: int, vae_factor: int = 8):
    """FineStage's own edit function (``modulation_edits``) for a model whose latents are ``side`` x ``side``,
    built without a model (a stand-in generator carries what the edit reads)."""
    from diffusers.models.attention_processor import Attention

    unet = nn.Module()
    unet.down_blocks = nn.ModuleDict({"attn1": Attention(8, heads=1, dim_head=8)})
    generator = SimpleNamespace(train_scheduler=SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000)),
                                default_resolution=side * vae_factor, vae_scale_factor=vae_factor, unet=unet)
    module = SimpleNamespace(generator=generator, step_fraction=0.3, power=5.0, cross_strength=1.0,
                             self_strength=0.3, attention=("self",), layer_prefixes=("down_blocks",))
    (edit,) = fs.FineStage.modulation_edits(module, objects, SamplingSettings(50))
    return edit


def old_scores_to_probs(attn, query, key, mask, edits, context):
    """``attention.scores_to_probs`` before issue 27: a full-size ``torch.empty`` as baddbmm's ignored input."""
    dtype = query.dtype
    if mask is None:
        base, beta = torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device), 0
    else:
        base, beta = mask, 1
    scores = torch.baddbmm(base, query, key.transpose(-1, -2), beta=beta, alpha=attn.scale)
    for edit in edits:
        scores = edit.fn(scores, context)
    return scores.softmax(dim=-1).to(dtype)


def measure(batch: int, side: int, heads: int, head_dim: int, dtype: torch.dtype, cfg: bool = True,
            device: str = "meta") -> dict:
    """Peak bytes above the live ones (inputs, cached masks) of the edit alone on given scores, and of one whole
    edited self-attention ``scores_to_probs`` call, before and after issue 27."""
    n = side * side
    rows = (2 if cfg else 1) * batch * heads
    objects = random_objects(batch, side * 8, per_image=3)
    edit = self_edit(objects, side)
    ctx = EditContext("down_blocks.attn1", 0, 981, heads, cfg, (side, side))
    attn = SimpleNamespace(upcast_attention=False, upcast_softmax=False, scale=head_dim ** -0.5)
    modulations = [fs._to(fs.self_modulation(o, (side, side)), torch.device(device)) for o in objects]
    lam = edit_lambda(ctx)
    q = torch.empty(rows, n, head_dim, dtype=dtype, device=device)
    k = torch.empty(rows, n, head_dim, dtype=dtype, device=device)
    old = fs.ScoreEdit(lambda s, c: old_edit(s, c, modulations, lam), edit.layers)
    edit.fn(torch.empty(rows, n, n, dtype=dtype, device=device), ctx)  # the edit's masks cached, as after step 0
    scores = torch.empty(rows, n, n, dtype=dtype, device=device)
    peaks = {}
    for name, fn in (("edit_before", lambda: old.fn(scores, ctx)), ("edit_after", lambda: edit.fn(scores, ctx)),
                     ("call_plain_before", lambda: old_scores_to_probs(attn, q, k, None, (), ctx)),
                     ("call_before", lambda: old_scores_to_probs(attn, q, k, None, (old,), ctx)),
                     ("call_plain_after", lambda: scores_to_probs(attn, q, k, None, (), ctx)),
                     ("call_after", lambda: scores_to_probs(attn, q, k, None, (edit,), ctx))):
        existing = (q, k, scores, *[t for m in modulations for t in (m.positive, m.weight)])
        with LiveBytes(existing) as live:
            fn()
        peaks[name] = live.peak
    scores_bytes = rows * n * n * torch.finfo(dtype).bits // 8
    return {"batch": batch, "queries": n, "heads": heads, "head_dim": head_dim, "cfg": cfg, "dtype": str(dtype),
            "scores_gib": scores_bytes / 2**30, "peak_gib": {k: v / 2**30 for k, v in peaks.items()},
            "edit_ratio": peaks["edit_before"] / peaks["edit_after"],
            "call_ratio": peaks["call_before"] / peaks["call_after"]}


def edit_lambda(ctx: EditContext, strength: float = 0.3, power: float = 5.0, total: int = 1000) -> float:
    return strength * (ctx.timestep / total) ** power


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", type=int, default=64, help="latent (= self-attention map) side: 64 for SD1.5 512 px")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=40)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = [measure(args.batch, args.side, args.heads, args.head_dim, dtype) for dtype in (torch.float32, torch.float16)]
    for r in results:
        p = r["peak_gib"]
        print(f"{r['dtype']}: batch {r['batch']} (CFG: {2 * r['batch']} rows) x {r['heads']} heads, {r['queries']} "
              f"queries, head dim {r['head_dim']}; the scores alone {r['scores_gib']:.2f} GiB")
        print(f"  the edit alone (above the scores): before {p['edit_before']:.2f} GiB, after {p['edit_after']:.2f} "
              f"GiB ({r['edit_ratio']:.0f}x less)")
        print(f"  one edited scores_to_probs call (q, k -> probs): before {p['call_before']:.2f} GiB (unedited "
              f"{p['call_plain_before']:.2f}), after {p['call_after']:.2f} GiB (unedited {p['call_plain_after']:.2f}); "
              f"{r['call_ratio']:.2f}x less")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
