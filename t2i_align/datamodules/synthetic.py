"""A small synthetic image-caption(-mask) set of coloured shapes, for tests and the CPU demo.

It is written in TokenCompose's ``metadata.jsonl`` layout (``file_name``, ``text``, ``attn_list`` of
``[noun, mask_path]``), so it exercises the same reader as real COCO-style pairs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=fill)


def write_shape_pairs(root: str | Path, count: int = 32, size: int = 32, seed: int = 0) -> Path:
    """Write ``count`` images with one or two shapes, their captions and per-noun masks under ``root``.

    Returns the path of ``metadata.jsonl``.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(count):
        image = Image.new("RGB", (size, size), (245, 245, 245))
        draw = ImageDraw.Draw(image)
        n = 1 + (i % 2)
        cell = size // n
        objects, attn_list = [], []
        for k in range(n):
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
            pad = rng.randint(1, max(1, cell // 6))
            box = (k * cell + pad, pad + size // 4 - (n - 1) * 2, (k + 1) * cell - pad - 1, size - pad - size // 4)
            _draw(draw, shape, box, COLOURS[colour])
            mask = Image.new("L", (size, size), 0)
            _draw(ImageDraw.Draw(mask), shape, box, 255)
            mask_name = f"masks/{i:05d}_{k}_{shape}.png"
            mask.save(root / mask_name)
            objects.append(f"a {colour} {shape}")
            attn_list.append([shape, mask_name])
        file_name = f"images/{i:05d}.png"
        image.save(root / file_name)
        records.append({"file_name": file_name, "text": " and ".join(objects), "attn_list": attn_list})
    meta = root / "metadata.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in records))
    return meta
