"""The ToyWorld CLIP: a small ``transformers.CLIPModel`` trained contrastively on ToyWorld renders.

Used for CLIP score, CLIP reward and FID features; its text tower is the text encoder of the ToyWorld
Stable Diffusion pipeline. The saved folder loads with ``CLIPModel``, ``CLIPTokenizer``,
``CLIPImageProcessor`` and ``CLIPProcessor`` ``.from_pretrained``.

Trained (and resumed) by the ``text`` and ``clip`` stages of ``python -m t2i_align.commands.toyworld_pretrain``.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from t2i_align.diffusion.assets import TINY_TOKENIZER_DIR
from t2i_align.toyworld.pretraining.batches import (
    CLIP_MEAN,
    CLIP_STD,
    LoopConfig,
    heldout_scenes,
    normalize,
    render_batch,
    to_float,
    train_loop,
)

STREAM = "clip"
IMAGE_SIZE = 64
MAX_LOGIT_SCALE = math.log(100.0)


def build_clip(seed: int = 0, hidden: int = 128, layers: int = 4, heads: int = 4, projection: int = 128) -> CLIPModel:
    """A randomly initialised ToyWorld CLIP (text: the tiny CLIP tokenizer, 77 positions; vision: 64 px, patch 8)."""
    tokenizer = CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length, projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=IMAGE_SIZE, patch_size=8, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, projection_dim=projection,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
    torch.manual_seed(seed)
    return CLIPModel(config)


def image_processor() -> CLIPImageProcessor:
    """64 px processor: resize (a no-op on 64 px renders) + centre crop 64, CLIP mean/std."""
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )


def tokenize(tokenizer: CLIPTokenizer, captions: list[str], device: torch.device | str) -> dict[str, torch.Tensor]:
    enc = tokenizer(captions, padding=True, truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt")
    return {"input_ids": enc.input_ids.to(device), "attention_mask": enc.attention_mask.to(device)}


def contrastive_loss(logits_per_image: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric CLIP loss; pairs with identical captions all count as positives (soft targets)."""
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions], device=logits_per_image.device)
    same = (ids[:, None] == ids[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    loss_i = -(targets * F.log_softmax(logits_per_image, 1)).sum(1).mean()
    loss_t = -(targets * F.log_softmax(logits_per_image.t(), 1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def train_clip(out_dir: str | Path, steps: int, batch_size: int = 128, lr: float = 5e-4, seed: int = 0,
               device: str = "cpu", checkpoint_every: int = 200, log_every: int = 50, warmup: int = 200,
               schedule: str = "constant", decay_steps: int | None = None, num_workers: int = 0,
               world_seed: int = 0) -> Path:
    """Train (or resume) the ToyWorld CLIP in ``out_dir``; returns the ``save_pretrained`` folder."""
    tokenizer = CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    cfg = LoopConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, warmup=warmup, schedule=schedule,
                     decay_steps=decay_steps, checkpoint_every=checkpoint_every, log_every=log_every,
                     num_workers=num_workers, world_seed=world_seed, device=device)

    def loss_fn(model: CLIPModel, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        out = model(pixel_values=normalize(to_float(images)), **tokenize(tokenizer, captions, images.device))
        return contrastive_loss(out.logits_per_image, captions)

    def clamp_scale(model: CLIPModel) -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def save_final(model: CLIPModel, folder: Path) -> None:
        model.save_pretrained(folder)
        CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(folder)
        image_processor().save_pretrained(folder)  # also a standalone preprocessor_config.json
        for name in ("vocab.json", "merges.txt"):  # transformers 5 writes only tokenizer.json; keep the SD layout too
            shutil.copy(TINY_TOKENIZER_DIR / name, folder / name)
        (folder / "toyworld_training.json").write_text(json.dumps({"model": "clip", **asdict(cfg)}, indent=2) + "\n")

    return train_loop(out_dir, build_clip(seed), loss_fn, save_final, STREAM, cfg, after_step=clamp_scale)


@torch.no_grad()
def embed(model: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor,
          captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm (image, text) embeddings of float images in [0, 1] and captions."""
    device = next(model.parameters()).device
    out = model(pixel_values=normalize(images.to(device)), **tokenize(tokenizer, captions, device))
    return out.image_embeds, out.text_embeds


@torch.no_grad()
def text_embeddings(model: CLIPModel, tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Unit-norm text embeddings (``get_text_features`` returns an output object in transformers 5)."""
    out = model.get_text_features(**tokenize(tokenizer, captions, next(model.parameters()).device))
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(feats, dim=-1)


@torch.no_grad()
def clip_quality(model_dir: str | Path, n: int = 512, seed: int = 1234, source: str = "mix", batch: int = 64,
                 device: str = "cpu") -> dict[str, float]:
    """Retrieval on held-out renders and sensitivity to corrupted captions.

    ``i2t_top1``/``t2i_top1``: top-1 retrieval within batches of ``batch`` (a hit when the retrieved caption
    equals the true one, so duplicate captions are not penalised); ``corruption_acc``: fraction of (caption,
    corruption) pairs (see :func:`~t2i_align.toyworld.experts.captioner.corruptions`) where the image is closer to
    its caption. ``source``: ``mix`` (held-out scenes of the training mix) or ``eval`` (scenes of the
    evaluation prompts, never trained on).
    """
    from t2i_align.toyworld.experts.captioner import corruptions

    model = CLIPModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir)
    scenes = heldout_scenes(source, seed, n)
    i2t = t2i = pairs = wins = 0
    for k in range(0, n, batch):
        chunk = scenes[k:k + batch]
        captions = [s.caption for s in chunk]
        image_emb, text_emb = embed(model, tokenizer, to_float(render_batch(chunk, IMAGE_SIZE)), captions)
        sims = image_emb @ text_emb.t()
        i2t += sum(captions[j] == captions[i] for i, j in enumerate(sims.argmax(1).tolist()))
        t2i += sum(captions[j] == captions[i] for i, j in enumerate(sims.argmax(0).tolist()))
        negatives = [[c.text() for c in corruptions(scene.spec)] for scene in chunk]
        flat = [text for group in negatives for text in group]
        if flat:
            neg_emb = text_embeddings(model, tokenizer, flat)
            owner = torch.tensor([i for i, group in enumerate(negatives) for _ in group], device=neg_emb.device)
            neg_sims = (neg_emb * image_emb[owner]).sum(1)
            wins += int((neg_sims < sims.diagonal()[owner]).sum())
            pairs += len(flat)
    return {"i2t_top1": i2t / n, "t2i_top1": t2i / n, "corruption_acc": wins / max(pairs, 1), "pairs": float(pairs),
            "n": float(n)}
