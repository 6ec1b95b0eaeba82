"""Turn image-caption pairs into TokenCompose's ``metadata.jsonl``: the caption's nouns and one mask per noun::

    python -m t2i_align.commands.annotate_masks PAIRS OUT [--image-root DIR] [--format auto|coco|jsonl] [--limit N]
        [--segmenter CLASS_PATH] [--segmenter-args JSON] [--spacy-model en_core_web_sm] [--device cpu]

* Nouns: spaCy part-of-speech tags, each noun (or proper noun) with the compound nouns before it ("chocolate
  spread"), in caption order, as the caption writes them; a repeated noun is listed again (TokenCompose matches
  it to its next occurrence).
* Masks: the segmenter protocol (:mod:`t2i_align.experts.segmenter`; Grounded-SAM's role, the ToyWorld segmenter
  on ToyWorld) on the image at its own size, written as 0/255 PNGs under ``OUT/seg/<n>/``; a noun the segmenter
  does not find gets ``null`` (TokenCompose then skips it).
* Output: ``OUT/metadata.jsonl`` with ``file_name`` (the image, relative to ``OUT``), ``text``, ``id`` and
  ``attn_list`` — the layout :class:`~t2i_align.datamodules.pairs.PairSource` reads (``configs/data/
  tokencompose_pairs.yaml``), the released file's layout.
* Resumable and rank-split: pair ``n`` is finished when ``OUT/records/<n>.json`` exists (written atomically after
  its masks), so a killed run continues where it stopped; under torchrun/SLURM (``RANK``, ``WORLD_SIZE``) each
  rank takes every ``WORLD_SIZE``-th pair. The rank that finds every pair finished writes ``metadata.jsonl``
  (atomically, in input order). An image that is missing or cannot be decoded is reported by file name and left
  out of ``metadata.jsonl`` (listed in ``OUT/skipped.jsonl``); it leaves no record behind.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from t2i_align.common import build_from_class_path
from t2i_align.datamodules.pairs import PAIR_FORMATS, PairRecord
from t2i_align.io import atomic_path

DEFAULT_SEGMENTER = "t2i_align.toyworld.experts.segmenter.ToySegmenter"


def caption_nouns(text: str, nlp: Any) -> list[str]:
    """The caption's nouns, each with the compound nouns right before it, in order and as written."""
    doc = nlp(text)
    nouns = []
    for tok in doc:
        if tok.pos_ not in ("NOUN", "PROPN") or tok.dep_ == "compound":
            continue  # a compound noun is part of the noun it modifies
        start = tok.i
        while True:
            prev = doc[start - 1] if start > 0 else None
            if prev is not None and prev.dep_ == "compound" and prev.pos_ in ("NOUN", "PROPN") \
                    and start - 1 < prev.head.i <= tok.i:
                start -= 1
            elif prev is not None and start > 1 and prev.text == "-" and not prev.whitespace_ \
                    and not doc[start - 2].whitespace_:
                start -= 2  # a hyphenated word ("Coca-Cola") stays whole
            else:
                break
        nouns.append(doc[start:tok.i + 1].text)
    return nouns


def read_pairs(path: Path, image_root: Path | None, fmt: str, limit: int | None) -> list[PairRecord]:
    """The pairs to annotate (COCO: the first caption of each image, as TokenCompose chose one per image)."""
    if fmt == "auto":
        fmt = {".json": "coco", ".jsonl": "jsonl"}.get(path.suffix)
        if fmt is None:
            raise ValueError(f"{path}: cannot tell the format from the extension; pass --format coco or jsonl")
    records = PAIR_FORMATS[fmt](path, image_root or path.parent, "image")
    return records[:limit] if limit is not None else records


def _mask_name(noun: str, k: int) -> str:
    return f"{k}_{re.sub(r'[^A-Za-z0-9]+', '_', noun).strip('_') or 'noun'}.png"


def annotate_one(index: int, record: PairRecord, out: Path, nlp: Any, segmenter: Any, device: str) -> dict:
    """Masks of one pair written under ``out/seg/<index>/``; returns its metadata record (or a skip record)."""
    try:
        with Image.open(record.image) as img:
            pixels = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)
    except (OSError, ValueError) as e:  # missing, truncated or not an image
        print(f"annotate_masks: skipped {record.image} ({record.where}): {e}", flush=True)
        return {"skipped": record.image, "where": record.where, "reason": str(e)}
    nouns = caption_nouns(record.caption, nlp)
    attn_list: list[list[str | None]] = []
    if nouns:
        images = pixels.permute(2, 0, 1)[None].to(device)
        [masks] = segmenter.masks(images, [nouns])
        for k, (noun, mask) in enumerate(zip(nouns, masks.cpu())):
            if not bool(mask.any()):
                attn_list.append([noun, None])
                continue
            name = Path("seg") / str(index) / _mask_name(noun, k)
            with atomic_path(out / name) as tmp:
                Image.fromarray(mask.numpy().astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
            attn_list.append([noun, name.as_posix()])
    return {"file_name": os.path.relpath(record.image, out), "text": record.caption, "id": record.id,
            "attn_list": attn_list}


def _rank_split() -> tuple[int, int]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return rank, world


def merge(out: Path, count: int) -> bool:
    """Write ``metadata.jsonl`` (and ``skipped.jsonl``) if all ``count`` pairs are finished; True if written."""
    paths = [out / "records" / f"{n}.json" for n in range(count)]
    if not all(p.exists() for p in paths):
        return False
    done = [json.loads(p.read_text()) for p in paths]
    kept = [r for r in done if "skipped" not in r]
    with atomic_path(out / "metadata.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    with atomic_path(out / "skipped.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in done if "skipped" in r))
    return True


def annotate(pairs: Path, out: Path, segmenter: Any, nlp: Any, image_root: Path | None = None, fmt: str = "auto",
             limit: int | None = None, device: str = "cpu") -> dict:
    """Annotate this rank's share of ``pairs`` into ``out``; returns counts."""
    records = read_pairs(pairs, image_root, fmt, limit)
    rank, world = _rank_split()
    counts = {"pairs": len(records), "done_before": 0, "annotated": 0, "skipped": 0}
    for index in range(rank, len(records), world):
        target = out / "records" / f"{index}.json"
        if target.exists():
            counts["done_before"] += 1
            continue
        result = annotate_one(index, records[index], out, nlp, segmenter, device)
        counts["skipped" if "skipped" in result else "annotated"] += 1
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(result) + "\n")
    counts["merged"] = merge(out, len(records))
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", type=Path, help="COCO captions JSON or a JSONL of {file_name, text}")
    p.add_argument("out", type=Path)
    p.add_argument("--image-root", type=Path, default=None, help="default: the pair file's folder")
    p.add_argument("--format", default="auto", choices=["auto", *PAIR_FORMATS])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--segmenter", default=DEFAULT_SEGMENTER, help="class path of a segmenter (experts.segmenter)")
    p.add_argument("--segmenter-args", default="{}", help="its keyword arguments as JSON")
    p.add_argument("--spacy-model", default="en_core_web_sm")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    from t2i_align.diffusion.tokens import load_spacy

    try:
        init_args = json.loads(a.segmenter_args)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--segmenter-args: invalid JSON ({e.msg})") from None
    segmenter = build_from_class_path(a.segmenter, init_args, "--segmenter")
    counts = annotate(a.pairs, a.out, segmenter, load_spacy(a.spacy_model), a.image_root, a.format, a.limit, a.device)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
