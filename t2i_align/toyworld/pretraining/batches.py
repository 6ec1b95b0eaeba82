"""On-the-fly ToyWorld training batches (scenes -> rendered images + captions) and the shared training loop.

Every batch is a pure function of ``(stream, seed, step)``: the scenes of step ``k`` come from
``random.Random(f"{stream}-{seed}-{k}")``, so a resumed run sees exactly the batches a straight run sees,
whatever the number of loader workers. :func:`train_loop` checkpoints (model, optimizer, step, RNG state)
atomically into its output folder and resumes from it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from t2i_align.io import atomic_path
from t2i_align.toyworld.splits import eval_prompt_sets
from t2i_align.toyworld.world import COMPOSITIONAL, NATURAL, Scene, place, render, sample_scene

log = logging.getLogger(__name__)

# OpenAI CLIP normalisation (also BLIP's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EVAL_PER_CATEGORY = 100


@lru_cache(maxsize=8)
def eval_texts(world_seed: int = 0, per_category: int = EVAL_PER_CATEGORY) -> frozenset[str]:
    """Texts of the held-out evaluation prompts (never to be trained on)."""
    return frozenset(s.text() for specs in eval_prompt_sets(world_seed, per_category).values() for s in specs)


def sample_mix(rng: random.Random, n: int, exclude: frozenset[str] | set[str] = frozenset(),
               natural_share: float = 0.5) -> list[Scene]:
    """``n`` scenes, NATURAL with probability ``natural_share`` else COMPOSITIONAL (default 50/50), skipping
    captions in ``exclude``."""
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = sample_scene(NATURAL if rng.random() < natural_share else COMPOSITIONAL, rng)
        if scene.caption not in exclude:
            scenes.append(scene)
    return scenes


def eval_scenes(rng: random.Random, n: int, world_seed: int = 0) -> list[Scene]:
    """``n`` scenes placed from the evaluation prompts (cycled in a shuffled order)."""
    specs = [s for specs in eval_prompt_sets(world_seed, EVAL_PER_CATEGORY).values() for s in specs]
    rng.shuffle(specs)
    return [place(specs[i % len(specs)], COMPOSITIONAL, rng) for i in range(n)]


def heldout_scenes(source: str, seed: int, n: int) -> list[Scene]:
    """Held-out scenes: ``mix`` (a fresh stream of the training mix) or ``eval`` (the evaluation prompts)."""
    rng = random.Random(f"heldout-{source}-{seed}")
    if source == "mix":
        return sample_mix(rng, n)
    if source == "eval":
        return eval_scenes(rng, n)
    raise ValueError(f"unknown source {source!r} (mix | eval)")


def render_batch(scenes: list[Scene], size: int = 64) -> torch.Tensor:
    """Renders as a uint8 tensor ``B x 3 x size x size``."""
    arrays = np.stack([np.asarray(render(scene, size)[0]) for scene in scenes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``B x 3 x H x W`` -> float in [0, 1]."""
    return images.float() / 255.0


def normalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Float images in [0, 1] -> CLIP-normalised pixel values (differentiable)."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def step_rng(stream: str, seed: int, step: int) -> random.Random:
    return random.Random(f"{stream}-{seed}-{step}")


def step_batch(stream: str, seed: int, step: int, batch_size: int, exclude: frozenset[str],
               size: int = 64, natural_share: float = 0.5) -> tuple[torch.Tensor, list[str]]:
    """The training batch of ``step``: (uint8 images ``B x 3 x H x W``, captions)."""
    scenes = sample_mix(step_rng(stream, seed, step), batch_size, exclude, natural_share)
    return render_batch(scenes, size), [s.caption for s in scenes]


class StepBatches(IterableDataset):
    """Batches of steps ``start .. stop-1`` in order; workers take every ``num_workers``-th step."""

    def __init__(self, stream: str, seed: int, start: int, stop: int, batch_size: int, exclude: frozenset[str],
                 size: int = 64, natural_share: float = 0.5) -> None:
        self.stream, self.seed, self.start, self.stop = stream, seed, start, stop
        self.batch_size, self.exclude, self.size, self.natural_share = batch_size, exclude, size, natural_share

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + worker, self.stop, workers):
            yield step_batch(self.stream, self.seed, step, self.batch_size, self.exclude, self.size, self.natural_share)


def step_loader(stream: str, seed: int, start: int, stop: int, batch_size: int, exclude: frozenset[str],
                num_workers: int = 0, size: int = 64, natural_share: float = 0.5) -> DataLoader:
    """A loader yielding the batches of steps ``start .. stop-1`` in step order (round-robin over workers)."""
    dataset = StepBatches(stream, seed, start, stop, batch_size, exclude, size, natural_share)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=4 if num_workers else None,
                      persistent_workers=False)


# ------------------------------------------------------------------------------------------- training loop
@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings of :func:`train_loop` (``decay_steps``: cosine horizon, default ``steps``)."""

    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    warmup: int = 100
    schedule: str = "constant"  # constant | cosine | hold_cosine
    decay_steps: int | None = None
    decay_start: int | None = None  # hold_cosine: constant until here, then cosine to 0 at ``steps``
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    log_every: int = 50
    num_workers: int = 0
    world_seed: int = 0
    device: str = "cpu"
    natural_share: float = 0.5  # fraction of NATURAL scenes in the batches (1.0: the base model's data)


def lr_at(cfg: LoopConfig, step: int) -> float:
    """Linear warmup, then constant, cosine decay to 0 at ``decay_steps``, or constant until ``decay_start`` and
    cosine to 0 at ``steps`` (``hold_cosine``, so a constant run can be extended by a decay phase): a function
    of the step only."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        horizon = max((cfg.decay_steps or cfg.steps) - cfg.warmup, 1)
        progress = min((step - cfg.warmup) / horizon, 1.0)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "hold_cosine":
        start = cfg.steps if cfg.decay_start is None else cfg.decay_start
        if step < start:
            return cfg.lr
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min((step - start) / max(cfg.steps - start, 1), 1.0)))
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, embeddings' 1-d params and scalars."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


# Settings that must not change when a run resumes (they change the batches or the model).
_RESUME_KEYS = ("batch_size", "seed", "world_seed", "natural_share")


def train_loop(
    out_dir: str | Path,
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, list[str]], torch.Tensor],
    save_final: Callable[[torch.nn.Module, Path], None],
    stream: str,
    cfg: LoopConfig,
    after_step: Callable[[torch.nn.Module], None] | None = None,
) -> Path:
    """Train ``model`` on ToyWorld batches of ``stream`` up to ``cfg.steps``; returns ``out_dir/model``.

    ``loss_fn(model, uint8 images, captions)`` gives the loss. ``out_dir/checkpoint.pt`` is written every
    ``checkpoint_every`` steps and at the end, and a later call resumes from it (``steps`` may grow). The
    final model is written by ``save_final`` into ``out_dir/model`` (atomically); ``out_dir/log.jsonl``
    gets one line per ``log_every`` steps.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, final = out_dir / "checkpoint.pt", out_dir / "model"
    device = torch.device(cfg.device)
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    start = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        for key in _RESUME_KEYS:
            if ckpt["config"][key] != getattr(cfg, key):
                was = ckpt["config"][key]
                raise ValueError(f"{ckpt_path}: cannot resume with {key}={getattr(cfg, key)} (was {was})")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        log.info("resuming %s from step %d", out_dir, start)

    def checkpoint(step: int) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "config": asdict(cfg),
        }
        with atomic_path(ckpt_path) as tmp:
            torch.save(state, tmp)

    exclude = eval_texts(cfg.world_seed)
    loader = step_loader(stream, cfg.seed, start, cfg.steps, cfg.batch_size, exclude, cfg.num_workers,
                         natural_share=cfg.natural_share)
    if start > cfg.steps:
        log.warning("%s: checkpoint is at step %d, past steps=%d; returning it unchanged", out_dir, start, cfg.steps)
    tic, losses = time.perf_counter(), []
    batches = iter(loader)  # creating the iterator draws from torch's RNG: do it before restoring the state
    if start:
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    for step, (images, captions) in enumerate(batches, start=start):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss = loss_fn(model, images.to(device, non_blocking=True), captions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step(model)
        losses.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - tic
            record = {"step": done, "loss": sum(losses) / len(losses), "lr": lr_at(cfg, step),
                      "sec_per_step": elapsed / len(losses)}
            log.info("%s step %d loss %.4f (%.3f s/step)", stream, done, record["loss"], record["sec_per_step"])
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            tic, losses = time.perf_counter(), []
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            checkpoint(done)
    if start < cfg.steps:
        checkpoint(cfg.steps)
    if start < cfg.steps or not final.exists():
        model.eval()
        with atomic_path(final, is_dir=True) as tmp:
            save_final(model, tmp)
    return final


__all__ = [
    "CLIP_MEAN", "CLIP_STD", "LoopConfig", "StepBatches", "eval_scenes", "eval_texts", "heldout_scenes", "lr_at",
    "make_optimizer", "normalize", "render_batch", "sample_mix", "step_batch", "step_loader", "step_rng", "to_float",
    "train_loop",
]
