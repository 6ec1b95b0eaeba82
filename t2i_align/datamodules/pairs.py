"""Image-caption(-mask) pairs: COCO captions layout or a generic / TokenCompose ``metadata.jsonl`` layout."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from t2i_align.common import UserError

from .prompts import check_limit, clean_text, iter_jsonl, parse_coco_captions

__all__ = ["PAIR_FORMATS", "PairDataset", "PairFileError", "PairRecord", "PairSource", "collate_pairs"]

MaskList = list[tuple[str, "torch.Tensor | None"]]


class PairFileError(UserError, ValueError):
    """A pair annotation file, or a file it references, is missing or malformed (names file + record)."""


@dataclass(frozen=True)
class PairRecord:
    """One parsed pair: absolute image path, caption, id and optional ``(noun, mask path or None)`` list."""

    image: str
    caption: str
    id: str
    masks: tuple[tuple[str, str | None], ...] | None = None
    where: str = ""  # "file: line N" / "file: annotation id N", for error messages


@dataclass
class PairSource:
    """A pair set as given in a YAML config.

    Args:
        path: COCO captions JSON or JSONL (``{"file_name", "text", "attn_list"?}`` per line).
        image_root: folder that image (and mask) paths are relative to; default: the annotation file's folder.
        format: ``"auto"`` (by extension: .json -> coco, .jsonl -> jsonl), ``"coco"`` or ``"jsonl"``.
        per: COCO only: ``"caption"`` (one item per annotation) or ``"image"`` (first caption of each image).
        limit: keep only the first ``limit`` records.
        random_flip: flip image and masks horizontally for half of the items (see :class:`PairDataset`).
    """

    path: str
    image_root: str | None = None
    format: str = "auto"
    per: str = "caption"
    limit: int | None = None
    random_flip: bool = False

    def __post_init__(self) -> None:
        check_limit(self.limit, f"pair source {self.path}: limit")


def _read_coco(path: Path, root: Path, per: str) -> list[PairRecord]:
    """COCO captions JSON; ids are annotation ids (``per="caption"``) or image ids (``per="image"``)."""
    files, annotations = parse_coco_captions(path, PairFileError)
    if per == "caption":
        return [
            PairRecord(
                str(root / files[a["image_id"]]),
                clean_text(a["caption"]),
                str(a["id"]),
                None,
                f"{path}: annotation id {a['id']}",
            )
            for a in annotations
        ]
    first: dict[Any, dict[str, Any]] = {}
    for a in annotations:
        first.setdefault(a["image_id"], a)
    # Images are listed in "images" order; images without any caption are left out.
    return [
        PairRecord(
            str(root / name),
            clean_text(first[image_id]["caption"]),
            str(image_id),
            None,
            f"{path}: annotation id {first[image_id]['id']}",
        )
        for image_id, name in files.items()
        if image_id in first
    ]


def _read_jsonl(path: Path, root: Path, per: str) -> list[PairRecord]:
    """``{"file_name", "text", "attn_list"?, "id"?}`` per line (TokenCompose ``metadata.jsonl``:
    ``attn_list = [[noun, mask_path | null], ...]``, paths relative to the same root; mlpc-ucsd/TokenCompose,
    train/data/coco_gsam_img/train/metadata.jsonl). Ids: ``id`` if present, else the 0-based record index."""
    records = []
    for index, (line_no, obj) in enumerate(iter_jsonl(path, PairFileError)):
        where = f"{path}: line {line_no}"
        if not isinstance(obj.get("file_name"), str) or not isinstance(obj.get("text"), str):
            raise PairFileError(
                f'{where}: expected string keys "file_name" and "text", got keys {sorted(obj)}'
            )
        masks = None
        if obj.get("attn_list") is not None:
            attn = obj["attn_list"]
            ok = isinstance(attn, list) and all(
                isinstance(e, list)
                and len(e) == 2
                and isinstance(e[0], str)
                and isinstance(e[1], (str, type(None)))
                for e in attn
            )
            if not ok:
                raise PairFileError(f'{where}: "attn_list" must be a list of [noun, mask_path or null] pairs')
            masks = tuple((noun, None if m is None else str(root / m)) for noun, m in attn)
        caption = clean_text(obj["text"])
        if not caption:
            raise PairFileError(f"{where}: empty caption")
        records.append(
            PairRecord(str(root / obj["file_name"]), caption, str(obj.get("id", index)), masks, where)
        )
    return records


#: Format name -> reader ``(annotation_path, image_root, per) -> records``.
PAIR_FORMATS: dict[str, Callable[[Path, Path, str], list[PairRecord]]] = {
    "coco": _read_coco,
    "jsonl": _read_jsonl,
}
_SUFFIX_FORMATS = {".json": "coco", ".jsonl": "jsonl"}


def resize_center_crop(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Resize so the shorter side is ``size`` (PIL filters antialias when downscaling), then center-crop."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), resample=resample)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    return img.crop((left, top, left + size, top + size))


def _image_size(file: str, record: PairRecord) -> tuple[int, int]:
    """Width and height from the file header (the pixels are not decoded)."""
    try:
        with Image.open(file) as img:
            return img.size
    except OSError as e:
        raise PairFileError(f"{record.where}: cannot read {file} ({e})") from e


class PairDataset(Dataset):
    """Image-caption(-mask) pairs.

    Items: ``{"pixel_values": FloatTensor[3, R, R] in [0, 1], "caption": str, "id": str,
    "masks": [(noun, BoolTensor[R, R] | None), ...] | None}``. Images are converted to RGB, resized (shorter
    side to R, bicubic) and center-cropped; masks (read as L) get the same geometry (bilinear, then > 0.5).
    A mask must have its image's size (checked at construction): a mask of another size or aspect would be
    stretched out of register with the objects it marks.

    ``random_flip`` flips image and masks together for about half of the items, decided by ``(seed, index)``
    only (the same items flip in every epoch). Beware: flipping breaks captions with "left"/"right".
    All image and mask files are checked for existence at construction.
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None = None,
        format: str = "auto",
        resolution: int = 512,
        per: str = "caption",
        limit: int | None = None,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        path = Path(path)
        if format == "auto":
            format = _SUFFIX_FORMATS.get(path.suffix.lower(), "")
            if not format:
                raise PairFileError(
                    f"{path}: cannot infer pair format from the extension; pass format='coco'|'jsonl'"
                )
        if format not in PAIR_FORMATS:
            raise ValueError(
                f"unknown pair format {format!r}; expected 'auto' or one of {sorted(PAIR_FORMATS)}"
            )
        if per not in ("caption", "image"):
            raise ValueError(f"per must be 'caption' or 'image', got {per!r}")
        check_limit(limit, f"{path}: limit")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        root = Path(image_root) if image_root is not None else path.parent
        try:
            records = PAIR_FORMATS[format](path, root, per)[:limit]
        except UnicodeDecodeError as e:
            raise PairFileError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        if not records:
            raise PairFileError(f"{path}: no image-caption pairs found (empty file)")
        ids = [r.id for r in records]
        if len(set(ids)) != len(ids):
            raise PairFileError(f"{path}: duplicate ids; ids must be unique within a file")
        for r in records:
            if not os.path.isfile(r.image):
                raise PairFileError(f"{r.where}: image file not found: {r.image}")
            for noun, mask in r.masks or ():
                if mask is not None and not os.path.isfile(mask):
                    raise PairFileError(f"{r.where}: mask file for {noun!r} not found: {mask}")
            masks = [(noun, m) for noun, m in r.masks or () if m is not None]
            if masks:
                size = _image_size(r.image, r)
                for noun, mask in masks:
                    if _image_size(mask, r) != size:
                        w, h = _image_size(mask, r)
                        raise PairFileError(
                            f"{r.where}: the mask for {noun!r} ({mask}) is {w}x{h} but its image is {size[0]}x{size[1]}; "
                            "masks must have their image's size (resizing would move them off the objects)"
                        )
        self.records = records
        self.resolution = resolution
        self.random_flip = random_flip
        self.seed = seed

    @classmethod
    def from_source(cls, source: PairSource, resolution: int = 512, seed: int = 0) -> PairDataset:
        """Build from a :class:`PairSource` config."""
        return cls(
            source.path,
            source.image_root,
            source.format,
            resolution,
            source.per,
            source.limit,
            source.random_flip,
            seed,
        )

    def __len__(self) -> int:
        return len(self.records)

    def _flip(self, index: int) -> bool:
        return self.random_flip and random.Random(self.seed * 2**32 + index).random() < 0.5

    def _open(self, file: str, mode: str, record: PairRecord) -> Image.Image:
        try:
            with Image.open(file) as img:
                return img.convert(mode)
        except OSError as e:
            raise PairFileError(f"{record.where}: cannot read {file} ({e})") from e

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        size, flip = self.resolution, self._flip(index)
        image = self._open(rec.image, "RGB", rec)
        pixels = resize_center_crop(image, size, Image.Resampling.BICUBIC)
        pixel_values = torch.from_numpy(np.array(pixels, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if flip:
            pixel_values = pixel_values.flip(-1)
        masks: MaskList | None = None
        if rec.masks is not None:
            masks = []
            for noun, file in rec.masks:
                if file is None:
                    masks.append((noun, None))
                    continue
                mask = self._open(file, "L", rec)
                if mask.size != image.size:  # checked at construction; the file changed since
                    raise PairFileError(f"{rec.where}: mask {file} is {mask.size}, its image {image.size}")
                mask = resize_center_crop(mask, size, Image.Resampling.BILINEAR)
                tensor = torch.from_numpy(np.array(mask, dtype=np.float32) / 255.0 > 0.5)
                masks.append((noun, tensor.flip(-1) if flip else tensor))
        return {
            "pixel_values": pixel_values.contiguous(),
            "caption": rec.caption,
            "id": rec.id,
            "masks": masks,
        }


def collate_pairs(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; keep captions, ids and per-sample mask lists as lists (``masks`` is None when no item
    has masks, otherwise a list with one entry — a mask list or None — per item)."""
    masks = [it["masks"] for it in items]
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "captions": [it["caption"] for it in items],
        "ids": [it["id"] for it in items],
        "masks": None if all(m is None for m in masks) else masks,
    }
