"""Test-only Lightning pieces, importable by subprocess runs (the repo root is on PYTHONPATH there)."""

from __future__ import annotations

import hashlib
import json
import os

import lightning as L
import torch

from t2i_align.lightning_modules.finetune import Finetune, pair_batch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        ids = pair_batch(batch)["ids"]
        self.steps.append({"step": trainer.global_step, "ids": list(ids), "digest": trainable_digest(pl_module)})

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
            pairs = pair_batch(batch)
            loss = self.generator.denoising_loss(pairs["pixel_values"], pairs["captions"], self.step_generator())
            return self.guard_nonfinite(loss * float("nan"))
        return super().training_step(batch, batch_idx)
