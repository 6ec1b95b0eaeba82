"""Folder layouts that the official benchmark scorers read, so generated images can be scored there.

Each layout names the image file(s) of prompt ``index`` (file order) and can parse a name back; some write
metadata next to the images. Conventions (from each benchmark's own generation scripts and READMEs):

* ``t2i_compbench``: ``samples/<prompt>_<6-digit index>.png``, 10 images per prompt, the index running
  over the whole val file in order (prompt ``i``, image ``k`` -> ``i * 10 + k``);
* ``geneval``: ``<5-digit prompt index>/metadata.jsonl`` (the prompt's record) and
  ``<5-digit>/samples/<4-digit k>.png``, 4 per prompt;
* ``dpg_bench``: one 2 x 2 grid of 4 images per prompt, ``<item id>.png`` (the prompt file's stem);
* ``tifa``: ``<id>.png`` per prompt plus ``tifa_images.json`` (``{id: image path}``, TIFA's image input);
* ``multigen``: ``<prompt index>_<k>.png``, 10 per prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from t2i_align.datamodules.prompts import Prompt
from t2i_align.io import atomic_path


@dataclass(frozen=True)
class Layout:
    """A benchmark's layout. ``grid``: images per file side (DPG-Bench writes 2 x 2 grids)."""

    name: str
    images_per_prompt: int
    grid: int = 1

    def files(self, prompt: Prompt, index: int) -> list[str]:
        """Relative paths of the files of prompt ``index``: one per image, or one per grid."""
        n = self.images_per_prompt
        if self.name == "t2i_compbench":
            if "/" in prompt.text or "\x00" in prompt.text:
                raise ValueError(f"prompt {prompt.source}:{prompt.id} {prompt.text!r} cannot be a file name")
            return [f"samples/{prompt.text}_{index * n + k:06d}.png" for k in range(n)]
        if self.name == "geneval":
            return [f"{index:05d}/samples/{k:04d}.png" for k in range(n)]
        if self.name == "dpg_bench":
            return [f"{_safe_id(prompt)}.png"]
        if self.name == "tifa":
            return [f"{_safe_id(prompt)}.png" if n == 1 else f"{_safe_id(prompt)}_{k}.png" for k in range(n)]
        if self.name == "multigen":
            return [f"{index}_{k}.png" for k in range(n)]
        raise ValueError(f"unknown layout {self.name!r}; expected one of {sorted(LAYOUTS)}")

    def parse(self, relpath: str) -> tuple[str | int, int]:
        """Inverse of :meth:`files`: (prompt text for T2I-CompBench, prompt index for GenEval/MultiGen, prompt
        id for DPG-Bench/TIFA; image number k)."""
        path = Path(relpath)
        if self.name == "t2i_compbench":
            text, number = path.stem.rsplit("_", 1)
            return text, int(number) % self.images_per_prompt
        if self.name == "geneval":
            return int(path.parts[0]), int(path.stem)
        if self.name == "multigen":
            index, k = path.stem.split("_")
            return int(index), int(k)
        if self.name in ("dpg_bench", "tifa"):
            m = re.fullmatch(r"(.+)_(\d+)", path.stem) if self.name == "tifa" and self.images_per_prompt > 1 else None
            return (m[1], int(m[2])) if m else (path.stem, 0)
        raise ValueError(f"unknown layout {self.name!r}")

    def finalize(self, root: str | Path, prompts: Sequence[Prompt]) -> None:
        """Write the layout's metadata files (atomically)."""
        root = Path(root)
        if self.name == "geneval":
            for index, p in enumerate(prompts):
                record = {**p.meta, "prompt": p.text}
                target = root / f"{index:05d}" / "metadata.jsonl"
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as tmp:
                    tmp.write_text(json.dumps(record) + "\n")
        elif self.name == "tifa":
            mapping = {p.id: str(root / self.files(p, i)[0]) for i, p in enumerate(prompts)}
            with atomic_path(root / "tifa_images.json") as tmp:
                tmp.write_text(json.dumps(mapping, indent=1) + "\n")


def _safe_id(prompt: Prompt) -> str:
    if "/" in prompt.id or not prompt.id:
        raise ValueError(f"prompt id {prompt.id!r} of {prompt.source} cannot be a file name")
    return prompt.id


LAYOUTS = {
    "t2i_compbench": Layout("t2i_compbench", 10),
    "geneval": Layout("geneval", 4),
    "dpg_bench": Layout("dpg_bench", 4, grid=2),
    "tifa": Layout("tifa", 1),
    "multigen": Layout("multigen", 10),
}


def layout(name: str, images_per_prompt: int | None = None) -> Layout:
    """The named layout, optionally with another number of images per prompt (not for grids)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; expected one of {sorted(LAYOUTS)}")
    base = LAYOUTS[name]
    if images_per_prompt is None or images_per_prompt == base.images_per_prompt:
        return base
    if base.grid > 1:
        raise ValueError(f"{name}: a {base.grid} x {base.grid} grid holds exactly {base.images_per_prompt} images")
    return Layout(name, images_per_prompt)
