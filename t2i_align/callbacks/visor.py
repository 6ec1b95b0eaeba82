"""VISOR's object accuracy (Gokhale et al., 2022): for a prompt "A <relation> B", the share of images in which the
open-vocabulary detector finds both A and B (the precondition of VISOR's spatial score, which this does not
compute). VISOR's prompt set is every ordered pair of the 80 COCO classes with the four relations
(:func:`visor_prompts`); T2I-CompBench's and HRS's spatial prompts parse the same way."""

from __future__ import annotations

import re
from typing import Sequence

import torch

from t2i_align.callbacks.evaluation import EvalItem, GenerativeEvaluation
from t2i_align.experts.detector import Detector

VISOR_RELATIONS = ("to the left of", "to the right of", "above", "below")
# relations of T2I-CompBench's spatial prompts besides VISOR's, longest first when matching
OTHER_RELATIONS = ("on the left of", "on the right of", "on the top of", "on the bottom of", "on side of", "next to",
                   "near", "in front of", "behind")
_RELATION = "|".join(re.escape(r) for r in sorted(VISOR_RELATIONS + OTHER_RELATIONS, key=len, reverse=True))
_PROMPT = re.compile(rf"^(?:a|an|the)\s+(?P<a>.+?)\s+(?P<rel>{_RELATION})\s+(?:a|an|the)\s+(?P<b>.+?)\s*\.?$",
                     re.IGNORECASE)


def article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def visor_prompts(classes: Sequence[str], relations: Sequence[str] = VISOR_RELATIONS) -> list[str]:
    """Every ordered pair of distinct ``classes`` with every relation: "a dog to the left of an apple"."""
    return [f"{article(a)} {rel} {article(b)}" for a in classes for b in classes if a != b for rel in relations]


def spatial_objects(prompt: str) -> tuple[str, str]:
    """``(A, B)`` of "a/an/the A <relation> a/an/the B"; a prompt of another form is an error that names it."""
    m = _PROMPT.match(prompt.strip())
    if m is None:
        raise ValueError(f"not a two-object spatial prompt 'a A <relation> a B': {prompt!r} (relations: "
                         f"{', '.join(VISOR_RELATIONS + OTHER_RELATIONS)})")
    return m["a"], m["b"]


class VISORObjectAccuracy(GenerativeEvaluation):
    """Logs ``visor/object_accuracy`` (both objects found) and ``visor/object_recall`` (objects found) on two-object
    spatial prompts (``prompts``: :class:`~t2i_align.datamodules.prompts.PromptSource` list, every prompt of the form
    "a A <relation> a B"; the sampler arguments are :class:`GenerativeEvaluation`'s).

    Args:
        detector: ``class_path`` of a detector (:mod:`t2i_align.experts.detector`): default OWLv2; ToyWorld uses
            ``t2i_align.toyworld.experts.segmenter.ToyDetector``.
    """

    name = "visor"
    expert_attributes = ("detector",)  # moved to the module's device by run()

    def __init__(self, detector: Detector | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if detector is None:
            from t2i_align.experts.detector import OwlV2Detector

            detector = OwlV2Detector()
        self.detector = detector

    def load_items(self) -> list[EvalItem]:
        items = super().load_items()
        for item in items:
            spatial_objects(item.prompt)  # refuse a prompt set with other prompts before generating anything
        return items

    def settings(self) -> dict:
        return {**super().settings(), "detector": type(self.detector).__name__}

    def reset(self, pl_module) -> None:
        self.counts = torch.zeros(3, dtype=torch.float64)  # images, both found, objects found

    def update(self, images: torch.Tensor, items: Sequence[EvalItem], pl_module) -> list[dict]:
        found = self.detector.found(images, [list(spatial_objects(it.prompt)) for it in items])
        for row in found:
            self.counts += torch.tensor([1.0, float(all(row)), float(sum(row))], dtype=torch.float64)
        return [{"both_found": float(all(row))} for row in found]

    def compute(self, trainer, pl_module) -> dict[str, float]:
        counts = trainer.strategy.reduce(self.counts.to(pl_module.device), reduce_op="sum").cpu()
        return {"visor/object_accuracy": float(counts[1] / counts[0]),
                "visor/object_recall": float(counts[2] / (2 * counts[0]))}
