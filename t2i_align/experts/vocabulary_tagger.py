"""A tagger made of an open-vocabulary detector and a fixed label list: RAM's role ("which objects are in this
image?") answered by asking the detector for every label of the vocabulary (RAM's own tag list, COCO's 80 classes,
...) and keeping the ones it finds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from t2i_align.experts.base import ExpertModule, check_images, move_plain_parts
from t2i_align.experts.detector import Detector


def read_vocabulary(path: str | os.PathLike) -> list[str]:
    """Labels of a text file, one a line (surrounding spaces and blank lines dropped, duplicates kept once, in order).
    Raises naming the file when it is missing, unreadable or has no label."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"VocabularyTagger: no vocabulary file at {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"VocabularyTagger: cannot read the vocabulary file {path} "
                         f"(expected UTF-8 text, one label a line): {e}") from e
    labels = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not labels:
        raise ValueError(f"VocabularyTagger: the vocabulary file {path} has no label (expected one label a line)")
    return labels


class VocabularyTagger(ExpertModule):
    """Tags = the vocabulary labels the detector finds in an image, in vocabulary order.

    Args:
        detector: any :class:`~t2i_align.experts.detector.Detector` (``OwlV2Detector``, ``ToyDetector``, ...); one
            that holds models is an ``nn.Module`` (``OwlV2Detector``), a submodule here: ``.to(device)`` moves it.
        vocabulary: the labels, or the path of a text file with one label a line.
        chunk_size: labels asked per detector call (a detector's memory grows with its number of text queries).
    """

    def __init__(self, detector: Detector, vocabulary: Sequence[str] | str | os.PathLike,
                 chunk_size: int = 64) -> None:
        super().__init__()
        if isinstance(vocabulary, (str, os.PathLike)):
            labels = read_vocabulary(vocabulary)
        else:
            labels = list(dict.fromkeys(str(v).strip() for v in vocabulary))
            if not labels or not all(labels):
                raise ValueError(f"VocabularyTagger: expected a non-empty list of non-empty labels, got {vocabulary!r}")
        if chunk_size < 1:
            raise ValueError(f"VocabularyTagger: chunk_size must be at least 1, got {chunk_size}")
        self.detector, self.vocabulary, self.chunk_size = detector, labels, chunk_size

    def to(self, *args, **kwargs) -> VocabularyTagger:
        super().to(*args, **kwargs)
        move_plain_parts([self.detector], *args, **kwargs)  # a detector with its own `to` that is not a module
        return self

    @torch.no_grad()
    def tags(self, images: torch.Tensor) -> list[list[str]]:
        check_images(images, list(images), "VocabularyTagger")
        out: list[list[str]] = [[] for _ in range(len(images))]
        for start in range(0, len(self.vocabulary), self.chunk_size):
            chunk = self.vocabulary[start:start + self.chunk_size]
            found = self.detector.found(images, [chunk] * len(images))
            if len(found) != len(images) or any(len(row) != len(chunk) for row in found):
                raise RuntimeError(f"VocabularyTagger: the detector answered {[len(r) for r in found]} for "
                                   f"{len(images)} images of {len(chunk)} labels")
            for tags, row in zip(out, found):
                tags.extend(label for label, hit in zip(chunk, row) if hit)
        return out
