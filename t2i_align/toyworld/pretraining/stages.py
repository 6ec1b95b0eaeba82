"""Reproduce every pretrained ToyWorld model from a seed:
``python -m t2i_align.commands.toyworld_pretrain WORK_DIR --out models/toyworld [--device cuda] [--stages ...]``.

Stages (each resumes from ``WORK_DIR/<stage>/checkpoint.pt`` when interrupted; a finished stage returns at once):

1. ``vae``       KL autoencoder, 64 px -> 8 x 8 x 8 latents, on natural + compositional renders;
2. ``text``      the CLIP run up to ``--text-steps``; its text tower becomes SD's text encoder
                 (the CLIP schedule is constant, so this is exactly a prefix of stage 3);
3. ``clip``      the same CLIP run continued to ``--clip-steps`` (CLIP score / reward / FID features);
4. ``unet``      SD UNet on natural scenes only (the biased "web" distribution), frozen VAE + text encoder;
5. ``captioner`` BLIP-format captioning model on natural + compositional renders (the I2T teacher);
6. ``assemble``  writes ``OUT/pipeline`` (diffusers SD folder), ``OUT/clip``, ``OUT/captioner``, with weights
                 in float16 except SD's text encoder (load CLIP and the captioner with ``dtype=torch.float32``).

``text`` comes before ``clip`` and ``unet`` so that the UNet (the longest stage) need not wait for the
whole CLIP run: stages can run in separate processes (``--stages vae`` | ``--stages text clip captioner``).
"""

from __future__ import annotations

import time
from pathlib import Path

STAGES = ("vae", "text", "clip", "unet", "captioner", "assemble")
DEFAULT_STEPS = {"vae": 3000, "text": 1000, "clip": 2000, "unet": 12000, "captioner": 6000}


def run(work: Path, out: Path, stages: list[str], steps: dict[str, int], seed: int, device: str,
        num_workers: int = 0) -> None:
    from t2i_align.toyworld.experts import captioner, clip_model
    from t2i_align.toyworld.pretraining import sd as pretrain_sd

    work.mkdir(parents=True, exist_ok=True)
    text_dir = work / "text_encoder"
    kw = dict(seed=seed, device=device, num_workers=num_workers)
    for stage in stages:
        start = time.time()
        if stage == "vae":
            pretrain_sd.train_vae(work / "vae", steps["vae"], **kw)
        elif stage == "text":
            if not text_dir.exists():
                snapshot = clip_model.train_clip(work / "clip", steps["text"], **kw)
                pretrain_sd.export_text_encoder(snapshot, text_dir)
        elif stage == "clip":
            clip_model.train_clip(work / "clip", steps["clip"], **kw)
        elif stage == "unet":
            if not text_dir.exists():
                raise FileNotFoundError(f"{text_dir}: run the 'text' stage before 'unet'")
            pretrain_sd.train_unet(work / "unet", work / "vae" / "model", text_dir, steps["unet"], **kw)
        elif stage == "captioner":
            # constant LR for two thirds (4000 steps plateaued at 74 % exact captions), then cosine to 0
            n = steps["captioner"]
            captioner.train_captioner(work / "captioner", n, schedule="hold_cosine", decay_start=2 * n // 3, **kw)
        elif stage == "assemble":
            from transformers import BlipForConditionalGeneration, CLIPModel

            pretrain_sd.assemble_pipeline(out / "pipeline", work / "vae" / "model", text_dir, work / "unet" / "model")
            for name, model_class in (("clip", CLIPModel), ("captioner", BlipForConditionalGeneration)):
                pretrain_sd.save_half(work / name / "model", out / name, model_class)
        print(f"[{stage}] {time.time() - start:.0f} s", flush=True)
