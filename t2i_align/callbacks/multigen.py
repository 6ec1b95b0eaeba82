"""MultiGen (TokenCompose, Section 4): generate "a photo of a A, a B, a C, a D, and a E", detect each of the five
categories with an open-vocabulary detector, and report MG_k = the share of images in which at least k of them are
found (k = 2..5), together with the mean share of categories found. Prompt files: the released
``coco_obj_comp_5_1k.json`` / ``ade20k_obj_comp_5_1k.json`` (``unique_id``, ``text``, ``obj_<i>_attributes``).

During training or validation: :class:`MultiGenEvaluation`. On images exported with ``t2i-align predict`` in the
``multigen`` layout (``<prompt index>_<k>.png``) or made elsewhere in that layout::

    python -m t2i_align.commands.multigen EXPORT_DIR --prompt-file coco_obj_comp_5_1k.json \
        [--images-per-prompt 10] [--detector CLASS_PATH] [--detector-args JSON] [--batch-size 16]

prints the metrics and writes them, with every image's detections, to ``EXPORT_DIR/multigen_scores.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from t2i_align.callbacks.evaluation import EvalItem, GenerativeEvaluation
from t2i_align.common import derive_seed
from t2i_align.experts.detector import Detector


@dataclass(frozen=True)
class MultiGenPrompt:
    id: str
    text: str
    categories: tuple[str, ...]


def read_multigen(path: str | Path) -> list[MultiGenPrompt]:
    """The prompts of a MultiGen JSON file; a malformed entry is an error naming the file and its index."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a MultiGen prompt file ({e})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of prompts, got {type(entries).__name__}")
    prompts = []
    for i, e in enumerate(entries):
        try:
            n = int(e["num_objects"])
            categories = tuple(" ".join(e[f"obj_{k}_attributes"]) for k in range(1, n + 1))
            prompts.append(MultiGenPrompt(str(e["unique_id"]), str(e["text"]), categories))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: entry {i}: expected unique_id, text, num_objects and obj_<k>_attributes "
                             f"({type(err).__name__}: {err})") from None
    return prompts


def multigen_counts(found: Sequence[Sequence[bool]], max_k: int = 5) -> torch.Tensor:
    """``[images, categories found, categories, images with >= 2 found, ..., >= max_k found]`` (float64 sums)."""
    out = torch.zeros(3 + max_k - 1, dtype=torch.float64)
    for row in found:
        hits = sum(row)
        out[0] += 1
        out[1] += hits
        out[2] += len(row)
        for k in range(2, max_k + 1):
            out[1 + k] += hits >= k
    return out


def multigen_metrics(counts: torch.Tensor, max_k: int = 5) -> dict[str, float]:
    images = float(counts[0])
    out = {"object_recall": float(counts[1] / counts[2])}
    out.update({f"mg{k}": float(counts[1 + k]) / images for k in range(2, max_k + 1)})
    return out


class MultiGenEvaluation(GenerativeEvaluation):
    """MultiGen during training or validation: logs ``multigen_<file>/mg2`` ... ``mg5`` and ``object_recall``.

    The sampler arguments are :class:`~t2i_align.callbacks.evaluation.GenerativeEvaluation`'s (the paper: 10 images
    per prompt); its ``prompts`` is unused (they come from ``prompt_file``).

    Args:
        prompt_file: MultiGen JSON (``coco_obj_comp_5_1k.json`` or ``ade20k_obj_comp_5_1k.json``).
        detector: ``class_path`` of a detector (:mod:`t2i_align.experts.detector`): default OWLv2; ToyWorld uses
            ``t2i_align.toyworld.experts.segmenter.ToyDetector``.
        limit: only the first N prompts.
    """

    expert_attributes = ("detector",)  # moved to the module's device by run()

    def __init__(self, prompt_file: str, detector: Detector | None = None, limit: int | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.prompt_file = prompt_file
        self.prompts = {p.id: p for p in read_multigen(prompt_file)[:limit]}
        self.max_k = max(len(p.categories) for p in self.prompts.values())
        if detector is None:
            from t2i_align.experts.detector import OwlV2Detector

            detector = OwlV2Detector()
        self.detector = detector
        self.name = f"multigen_{Path(prompt_file).stem.split('_')[0]}"

    def load_items(self) -> list[EvalItem]:
        return [EvalItem(f"multigen/{p.id}/{k}", p.text, derive_seed(self.seed, "multigen", p.id, k) % (2**31), p.id)
                for p in self.prompts.values() for k in range(self.images_per_prompt)]

    def settings(self) -> dict:
        return {**super().settings(), "prompt_file": self.prompt_file, "detector": type(self.detector).__name__}

    def reset(self, pl_module) -> None:
        self.counts = torch.zeros(3 + self.max_k - 1, dtype=torch.float64)

    def update(self, images: torch.Tensor, items: Sequence[EvalItem], pl_module) -> list[dict]:
        found = self.detector.found(images, [self.prompts[it.group].categories for it in items])
        self.counts += multigen_counts(found, self.max_k)
        return [{"found": float(sum(row))} for row in found]

    def compute(self, trainer, pl_module) -> dict[str, float]:
        counts = trainer.strategy.reduce(self.counts.to(pl_module.device), reduce_op="sum").cpu()
        return {f"{self.name}/{k}": v for k, v in multigen_metrics(counts, self.max_k).items()}


def score_folder(folder: str | Path, prompt_file: str | Path, detector: Detector, images_per_prompt: int = 10,
                 batch_size: int = 16) -> dict:
    """MG_k of the images of ``folder`` in the ``multigen`` export layout; a missing image is an error naming it."""
    from t2i_align.datamodules.export import get_layout

    folder, layout = Path(folder), get_layout("multigen", images_per_prompt)
    prompts = read_multigen(prompt_file)
    jobs = [(folder / name, p) for index, p in enumerate(prompts) for name in layout.files(p, index)]
    missing = [str(path) for path, _ in jobs if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(jobs)} images missing, e.g. {missing[:3]} (layout multigen: "
                                f"<prompt index>_<k>.png, {images_per_prompt} per prompt of {prompt_file})")
    max_k = max(len(p.categories) for p in prompts)
    counts, records = torch.zeros(3 + max_k - 1, dtype=torch.float64), []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        images = torch.stack([torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)
                              .permute(2, 0, 1) for path, _ in batch])
        found = detector.found(images, [p.categories for _, p in batch])
        counts += multigen_counts(found, max_k)
        records += [{"image": path.name, "id": p.id, "found": dict(zip(p.categories, row))}
                    for (path, p), row in zip(batch, found)]
    return {"metrics": multigen_metrics(counts, max_k), "images": len(jobs), "prompt_file": str(prompt_file),
            "detector": type(detector).__name__, "per_image": records}
