"""Test-only Lightning pieces, importable by subprocess runs (the repo root is on PYTHONPATH there)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch

from t2i_align.callbacks.evaluation import GenerativeEvaluation
from t2i_align.diffusion.generator import SampleOutput
from t2i_align.lightning_modules.base import batch_pairs
from t2i_align.lightning_modules.finetune import Finetune
from t2i_align.toyworld.world import COMPOSITIONAL, Obj, parse_prompt, place, render

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_fit_args(tiny_sd: str, tiny_pairs: str, root, max_steps: int, *configs: str) -> list[str]:
    """``fit`` of Finetune on the tiny pipeline and pairs (batch 2) under ``root``: the base config stack, then
    ``configs`` (more --config files), then the tiny model and data paths."""
    base = ["trainer/cpu.yaml", "method/finetune.yaml", "model/tiny.yaml", "data/tiny_pairs.yaml"]
    stack = [os.path.join(REPO_ROOT, "configs", name) for name in base] + list(configs)
    return [
        "fit",
        *[arg for path in stack for arg in ("--config", str(path))],
        f"--model.init_args.generator.pretrained={tiny_sd}",
        f"--data.init_args.train_pairs.path={tiny_pairs}",
        f"--data.init_args.val_pairs.path={tiny_pairs}",
        "--data.init_args.batch_size=2",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={max_steps}",
    ]


def trainable_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


class RecordSteps(L.Callback):
    """Per rank: the trainable-weight digest after every step and the sample ids each step saw."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.steps: list[dict] = []
        self.validations = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ids = batch_pairs(batch, "RecordSteps")["ids"]
        loss = trainer.callback_metrics.get("train/loss")
        self.steps.append({"step": trainer.global_step, "ids": list(ids), "digest": trainable_digest(pl_module),
                           "loss": None if loss is None else float(loss)})

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validations += 1

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump({"steps": self.steps, "validations": self.validations, "world_size": trainer.world_size}, f)


class NaNFinetune(Finetune):
    """Finetune whose loss is replaced by NaN on the given batches (0-based, counting skipped ones)."""

    def __init__(self, *args, nan_batches: list[int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_batches = set(nan_batches or [])

    def training_step(self, batch, batch_idx):
        if self.batches_started - 1 in self.nan_batches:
            pairs = batch_pairs(batch, "NaNFinetune")
            loss = self.generator.denoising_loss(pairs["pixel_values"], pairs["captions"], self.step_rng())
            return self.guard_nonfinite(loss * float("nan"))
        return super().training_step(batch, batch_idx)


# ------------------------------------------------------------------------------------------ evaluation
class RecordEvaluation(GenerativeEvaluation):
    """Records, per rank and evaluation, which items it generated; logs the synced image count."""

    name = "record"

    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self.passes: list[list[str]] = []

    def reset(self, pl_module) -> None:
        self.passes.append([])

    def update(self, images, items, pl_module):
        self.passes[-1] += [it.key for it in items]
        return [{"mean": float(im.mean())} for im in images]

    def compute(self, trainer, pl_module) -> dict[str, float]:
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.passes, f)
        total = trainer.strategy.reduce(torch.tensor(float(len(self.passes[-1])), device=pl_module.device), reduce_op="sum")
        return {"record/images": float(total)}


class DumpMetrics(L.Callback):
    """Writes ``val/...`` callback metrics after every validation, per rank (runs after the evaluators)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.rows: list[dict] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.rows, f)


class ColourStats(torch.nn.Module):
    """A cheap FID feature module for tests: per-channel mean and standard deviation of each image."""

    num_features = 6
    tag = "colourstats"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.double().flatten(2)
        return torch.cat([x.mean(2), x.std(2)], 1)


def save_tiny_clip(folder, seed: int = 0) -> str:
    """A tiny random CLIP (64 px vision, the tiny tokenizer) saved like a real checkpoint folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    from t2i_align.diffusion.tiny import TINY_TOKENIZER_DIR
    from t2i_align.toyworld.experts.clip_model import image_processor

    tokenizer = CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    torch.manual_seed(seed)
    config = CLIPConfig(
        # the tokenizer's own special ids: CLIP pools the text at the first eos token
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def save_tiny_captioner(folder, seed: int = 0) -> str:
    """A tiny random ToyWorld-vocabulary BLIP captioner saved like a real checkpoint folder."""
    from transformers import BlipProcessor

    from t2i_align.toyworld.experts import captioner as cap

    tokenizer = cap.build_captioner_tokenizer(Path(folder) / "tokenizer")
    model = cap.build_captioner(seed, vision_hidden=32, text_hidden=32, layers=2, heads=2).eval()
    model.save_pretrained(folder)
    BlipProcessor(image_processor=cap.image_processor(), tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


class RenderingGenerator:
    """Stands in for a diffusion model: renders each prompt exactly (or with colours swapped)."""

    def __init__(self, swap_colours: bool = False) -> None:
        self.swap_colours = swap_colours
        self.calls = []

    def sample(self, prompts, seeds, sampling=None, **kwargs):
        self.calls.append((list(prompts), list(seeds), sampling))
        images = []
        for prompt, seed in zip(prompts, seeds):
            scene = place(parse_prompt(prompt), COMPOSITIONAL, random.Random(seed))
            if self.swap_colours and len(scene.objects) > 1:
                objs = list(scene.objects)
                colours = [o.colour for o in objs][::-1]
                scene = type(scene)(scene.spec, tuple(Obj(o.shape, c, o.size, o.texture, o.x, o.y) for o, c in zip(objs, colours)))
            image, _ = render(scene)
            images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
        return SampleOutput(torch.zeros(len(prompts), 4, 8, 8), torch.stack(images), None, ())


class RenderingModule(L.LightningModule):
    """A LightningModule whose :meth:`sample` renders prompts exactly (or with colours swapped), like
    ``AlignmentModule.sample``: for the evaluation callbacks' tests."""

    def __init__(self, swap_colours: bool = False) -> None:
        super().__init__()
        self.generator = RenderingGenerator(swap_colours)
        self.layer = torch.nn.Linear(1, 1)

    def sample(self, prompts, seeds, sampling=None, **kwargs):
        return self.generator.sample(prompts, seeds, sampling, **kwargs)

    def validation_step(self, batch, batch_idx):
        pass


class NaNUNet(L.Callback):
    """Makes every UNet output NaN during the given training batches (0-based, skipped ones counted): any
    method's loss becomes NaN there, whatever it computes from the UNet."""

    def __init__(self, batches: list[int]) -> None:
        self.batches = set(batches)
        self._original = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # callbacks run before the module's hook: batches_started is still this batch's index
        if pl_module.batches_started in self.batches:
            generator = pl_module.generator
            self._original = generator.unet_forward
            generator.unet_forward = lambda *a, **k: self._original(*a, **k) * float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._original is not None:
            del pl_module.generator.unet_forward  # back to the class's method
            self._original = None


class HalfSegmenter:
    """A segmenter protocol stand-in for tiny random images: the first phrase of every image fills the left
    half, the others are missing (all-False masks)."""

    def masks(self, images: torch.Tensor, phrases: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        out = []
        for texts in phrases:
            masks = torch.zeros(len(texts), *images.shape[-2:], dtype=torch.bool)
            if len(texts):
                masks[0, :, : images.shape[-1] // 2] = True
            out.append(masks)
        return out


class FixedTagger:
    """A tagger protocol stand-in: the same tags for every image."""

    def __init__(self, tags: list[str]) -> None:
        self.fixed = list(tags)

    def tags(self, images: torch.Tensor) -> list[list[str]]:
        return [list(self.fixed) for _ in images]


class SigtermAt(L.Callback):
    """Sends this process SIGTERM at the end of training step ``step`` (what a scheduler's time limit does), or
    during the first validation batch after that step (``in_validation``)."""

    def __init__(self, step: int, in_validation: bool = False) -> None:
        self.step, self.in_validation = step, in_validation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.in_validation:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_step == self.step and self.in_validation and batch_idx == 0 and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


class FailOnRank(L.Callback):
    """Raises, on rank ``rank`` only, at the start of step ``step``: the error a bad input file gives there."""

    def __init__(self, rank: int, step: int, message: str = "pairs.jsonl:3: image 'cat.png' cannot be read") -> None:
        self.rank, self.step, self.message = rank, step, message

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            from t2i_align.datamodules.pairs import PairFileError

            raise PairFileError(self.message)
