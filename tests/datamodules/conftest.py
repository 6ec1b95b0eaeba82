"""Shared fixtures for the data package tests."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def provenance_counts(benchmarks: Path) -> dict[str, int]:
    """``local file -> records`` parsed from the table in PROVENANCE.md (leading integer of "records")."""
    counts: dict[str, int] = {}
    for line in (benchmarks / "PROVENANCE.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 9 and (m := re.match(r"(\d+)", cells[7])):
            counts[cells[0]] = int(m.group(1))
    return counts


def _save_image(path: Path, array: np.ndarray) -> Path:
    """Write an uint8 array (H, W[, 3]) as an image, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def save_image() -> Callable[[Path, np.ndarray], Path]:
    """``save_image(path, uint8_array)`` writes an image file (parents created)."""
    return _save_image


@pytest.fixture
def make_pair_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Build a small JSONL pair set: 40x20 images, left half red / right half blue, a left-half mask."""

    def make(n: int = 3, with_masks: bool = True) -> Path:
        lines = []
        for i in range(n):
            img = np.zeros((20, 40, 3), np.uint8)
            img[:, :20, 0] = 255
            img[:, 20:, 2] = 255
            _save_image(tmp_path / "images" / f"{i}.png", img)
            rec: dict = {"file_name": f"images/{i}.png", "text": f"caption {i}"}
            if with_masks:
                mask = np.zeros((20, 40), np.uint8)
                mask[:, :20] = 255
                _save_image(tmp_path / "seg" / f"{i}_left.png", mask)
                rec["attn_list"] = [["left", f"seg/{i}_left.png"], ["nothing", None]]
            lines.append(json.dumps(rec))
        path = tmp_path / "metadata.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return make
