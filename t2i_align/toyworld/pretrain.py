"""Reproduce every pretrained ToyWorld model from a seed:
``python -m t2i_align.toyworld.pretrain WORK_DIR --out models/toyworld [--device cuda] [--stages ...]``.

Stages (each resumes from ``WORK_DIR/<stage>/state.pt`` when interrupted; finished stages are skipped):

1. ``vae``       KL autoencoder, 64 px -> 8 x 8 x 4 latents, on natural + compositional renders;
2. ``clip``      CLIP-format model (CLIP score / reward / FID features; its text tower is SD's text encoder);
3. ``unet``      SD UNet on natural scenes only (the biased "web" distribution), frozen VAE + CLIP text;
4. ``captioner`` BLIP-format captioning model on natural + compositional renders (the I2T teacher);
5. ``assemble``  writes ``OUT/pipeline`` (diffusers SD folder), ``OUT/clip``, ``OUT/captioner``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

STAGES = ("vae", "clip", "unet", "captioner", "assemble")
DEFAULT_STEPS = {"vae": 3000, "clip": 3000, "unet": 15000, "captioner": 4000}


def run(work: Path, out: Path, stages: list[str], steps: dict[str, int], seed: int, device: str) -> None:
    from t2i_align.toyworld import captioner, clip_model, pretrain_sd

    work.mkdir(parents=True, exist_ok=True)
    done = {
        "vae": work / "vae" / "model",
        "clip": work / "clip" / "model",
        "unet": work / "unet" / "model",
        "captioner": work / "captioner" / "model",
    }
    for stage in stages:
        start = time.time()
        if stage != "assemble" and done[stage].exists():
            print(f"[{stage}] already finished: {done[stage]}")
            continue
        if stage == "vae":
            pretrain_sd.train_vae(work / "vae", steps["vae"], seed=seed, device=device)
        elif stage == "clip":
            clip_model.train_clip(work / "clip", steps["clip"], seed=seed, device=device)
        elif stage == "unet":
            text_dir = pretrain_sd.export_text_encoder(done["clip"], work / "text_encoder")
            pretrain_sd.train_unet(work / "unet", done["vae"], text_dir, steps["unet"], seed=seed, device=device)
        elif stage == "captioner":
            captioner.train_captioner(work / "captioner", steps["captioner"], seed=seed, device=device)
        elif stage == "assemble":
            text_dir = pretrain_sd.export_text_encoder(done["clip"], work / "text_encoder")
            pretrain_sd.assemble_pipeline(out / "pipeline", done["vae"], text_dir, done["unet"])
            for name in ("clip", "captioner"):
                if (out / name).exists():
                    shutil.rmtree(out / name)
                shutil.copytree(done[name], out / name)
        print(f"[{stage}] {time.time() - start:.0f} s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path, help="working folder for stage checkpoints")
    p.add_argument("--out", type=Path, default=Path("models/toyworld"))
    p.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    for stage, n in DEFAULT_STEPS.items():
        p.add_argument(f"--{stage}-steps", type=int, default=n)
    a = p.parse_args(argv)
    steps = {stage: getattr(a, f"{stage}_steps") for stage in DEFAULT_STEPS}
    run(a.work, a.out, a.stages, steps, a.seed, a.device)


if __name__ == "__main__":
    main()
