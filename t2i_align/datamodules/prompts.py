"""Prompt lists: readers for the common benchmark / training prompt formats, weighted mixing, a Dataset.

Conventions shared by every reader:

* ``Prompt.text`` is cleaned: BOMs removed, line breaks inside a record (hard-wrapped multi-line CSV cells)
  collapsed to one space, surrounding whitespace stripped. Nothing else is changed.
* ``Prompt.id`` is taken from the file where the format has one (TIFA ``id``, MultiGen ``unique_id``,
  ImageReward ``id``, ReFL ``image``, COCO annotation ``id``, DPG-Bench file stem, an ``id`` key/column).
  Otherwise it is the **0-based index of the record among the file's records** (blank lines skipped), so for
  GenEval it equals the index GenEval uses for its ``<outdir>/<index:05d>/`` folders.
* Error messages give 1-based *line* numbers (as editors show them) or 0-based *record index* (same as the
  positional id) for JSON lists.
* Malformed records raise :class:`PromptFileError`; nothing is skipped silently except blank lines.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from t2i_align.common import ConfigError, UserError

__all__ = [
    "PROMPT_FORMATS",
    "Prompt",
    "PromptDataset",
    "PromptFileError",
    "PromptSource",
    "clean_text",
    "collate_prompts",
    "load_prompt_sources",
    "read_prompts",
    "sniff_format",
]

# Keys that may hold the prompt text in JSON / JSONL records and generic CSVs (matched case-insensitively
# for CSV headers). Exactly one of them must be present in a record.
_TEXT_KEYS = ("prompt", "text", "caption")
_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


class PromptFileError(UserError, ValueError):
    """A prompt file is missing, empty or malformed; the message names the file and the line/record."""


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``(source, id)`` is unique; ``meta`` holds JSON-serialisable extra fields."""

    text: str
    source: str
    id: str
    meta: dict[str, Any] = field(default_factory=dict)


def clean_text(text: str) -> str:
    """Remove BOMs, collapse line breaks (and the whitespace around them) to one space, strip."""
    return _LINE_BREAKS.sub(" ", text.replace("\ufeff", "")).strip()


# --------------------------------------------------------------------------------------------------------
# Shared low-level helpers (also used by pairs.py)
# --------------------------------------------------------------------------------------------------------


def check_file(path: Path, error: type[ValueError]) -> None:
    """Raise ``error`` if ``path`` is not an existing regular file."""
    if not path.is_file():
        raise error(f"{path}: file not found" + (" (it is a directory)" if path.is_dir() else ""))


def iter_jsonl(path: Path, error: type[ValueError]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for every non-blank line of a JSONL file (BOM/CRLF tolerant)."""
    check_file(path, error)
    with open(path, encoding="utf-8-sig", newline=None) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(
                    f"{path}: line {line_no}: invalid JSON ({e.msg}); expected one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise error(f"{path}: line {line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def load_json(path: Path, error: type[ValueError]) -> Any:
    """Load a whole JSON file, reporting the failing line on syntax errors."""
    check_file(path, error)
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise error(f"{path}: file is empty; expected a JSON document")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def parse_coco_captions(path: Path, error: type[ValueError]) -> tuple[dict[Any, str], list[dict[str, Any]]]:
    """Parse a COCO captions file ``{"images": [{"id", "file_name"}], "annotations": [{"id", "image_id",
    "caption"}]}`` (format of ``captions_train2014.json``) into ``({image_id: file_name}, annotations)``."""
    data = load_json(path, error)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise error(f'{path}: expected a COCO captions object with "images" and "annotations" lists')
    files: dict[Any, str] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise error(f'{path}: images record index {i}: expected an object with "id" and "file_name"')
        files[img["id"]] = img["file_name"]
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not {"id", "image_id", "caption"} <= ann.keys():
            raise error(f'{path}: annotations record index {i}: expected "id", "image_id" and "caption"')
        if not isinstance(ann["caption"], str):
            raise error(f"{path}: annotation id {ann['id']}: caption must be a string")
        if ann["image_id"] not in files:
            raise error(f"{path}: annotation id {ann['id']}: image_id {ann['image_id']} is not in images")
    return files, data["annotations"]


def _text_key(record: Mapping[str, Any], keys: Sequence[str], where: str) -> str:
    """Return the single key of ``keys`` present in ``record`` (error if none or several)."""
    found = [k for k in keys if k in record]
    if len(found) != 1:
        what = "none" if not found else "several: " + ", ".join(found)
        raise PromptFileError(f"{where}: expected exactly one prompt key of {list(keys)}, found {what}")
    return found[0]


def _make_prompt(text: Any, source: str, id_: Any, meta: dict[str, Any], where: str) -> Prompt:
    if not isinstance(text, str):
        raise PromptFileError(f"{where}: prompt must be a string, got {type(text).__name__}")
    cleaned = clean_text(text)
    if not cleaned:
        raise PromptFileError(f"{where}: empty prompt")
    return Prompt(text=cleaned, source=source, id=str(id_), meta=meta)


# --------------------------------------------------------------------------------------------------------
# Readers: one per format, each ``(path, source) -> list[Prompt]``
# --------------------------------------------------------------------------------------------------------


def _read_txt(path: Path, source: str) -> list[Prompt]:
    """One prompt per line (T2I-CompBench, ABC-6K, CC-500, CoMat lists, GenEval generation_prompts.txt)."""
    check_file(path, PromptFileError)
    with open(path, encoding="utf-8-sig", newline=None) as f:  # newline=None: CRLF / CR become "\n"
        lines = f.read().split("\n")
    texts = [clean_text(line) for line in lines]
    return [Prompt(t, source, str(i)) for i, t in enumerate(t for t in texts if t)]


def _read_jsonl(path: Path, source: str) -> list[Prompt]:
    """One JSON object per line with one of ``prompt``/``text``/``caption`` and an optional ``id``; all other
    keys go to ``meta`` (e.g. GenEval ``evaluation_metadata.jsonl``: ``tag``, ``include``, ``exclude``)."""
    prompts = []
    for index, (line_no, obj) in enumerate(iter_jsonl(path, PromptFileError)):
        where = f"{path}: line {line_no}"
        key = _text_key(obj, _TEXT_KEYS, where)
        meta = {k: v for k, v in obj.items() if k not in (key, "id")}
        prompts.append(_make_prompt(obj[key], source, obj.get("id", index), meta, where))
    return prompts


def _read_json_records(
    path: Path, source: str, text_keys: Sequence[str] = _TEXT_KEYS, id_key: str | None = None
) -> list[Prompt]:
    """A JSON list of objects. The text key is the one of ``text_keys`` present; the id is ``record[id_key]``
    (or ``id`` when present, else the record index). Other keys go to ``meta``."""
    data = load_json(path, PromptFileError)
    if not isinstance(data, list):
        raise PromptFileError(f"{path}: expected a JSON list of prompt objects, got {type(data).__name__}")
    prompts = []
    for index, rec in enumerate(data):
        where = f"{path}: record index {index}"
        if not isinstance(rec, dict):
            raise PromptFileError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        key = _text_key(rec, text_keys, where)
        idk = id_key or ("id" if "id" in rec else None)
        if idk is not None and idk not in rec:
            raise PromptFileError(f"{where}: missing id key {idk!r}")
        meta = {k: v for k, v in rec.items() if k not in (key, idk)}
        prompts.append(_make_prompt(rec[key], source, rec[idk] if idk else index, meta, where))
    return prompts


def _read_coco(path: Path, source: str) -> list[Prompt]:
    """COCO captions annotations: one prompt per annotation, id = annotation id."""
    files, annotations = parse_coco_captions(path, PromptFileError)
    return [
        _make_prompt(
            ann["caption"],
            source,
            ann["id"],
            {"image_id": ann["image_id"], "file_name": files[ann["image_id"]]},
            f"{path}: annotation id {ann['id']}",
        )
        for ann in annotations
    ]


def _read_folder(path: Path, source: str) -> list[Prompt]:
    """A folder of ``*.txt`` files holding one prompt each (DPG-Bench ``prompts/``); id = file stem.
    Files are ordered by natural sort of the stem (``2`` before ``10``)."""
    if not path.is_dir():
        raise PromptFileError(f"{path}: prompt folder not found")

    def natural(p: Path) -> list[Any]:
        return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", p.stem)]

    prompts = []
    for file in sorted(path.glob("*.txt"), key=natural):
        lines = [t for t in (clean_text(x) for x in file.read_text(encoding="utf-8-sig").splitlines()) if t]
        if len(lines) != 1:
            raise PromptFileError(
                f"{file}: expected exactly one non-empty line (one prompt), found {len(lines)}"
            )
        prompts.append(Prompt(lines[0], source, file.stem))
    return prompts


def _iter_csv(path: Path) -> Iterator[tuple[int, int, dict[str, str]]]:
    """Yield ``(row_index, first_line, row)`` of a CSV with header; multi-line cells, BOM, CRLF tolerant."""
    check_file(path, PromptFileError)
    # newline="" is required by the csv module so that line breaks inside quoted cells are kept.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            index = 0
            while True:
                first_line = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    return
                if not row:  # blank line
                    continue
                if len(row) != len(header):
                    raise PromptFileError(
                        f"{path}: line {first_line}: expected {len(header)} fields ({', '.join(header)}), "
                        f"got {len(row)}"
                    )
                yield index, first_line, dict(zip(header, row, strict=True))
                index += 1
        except csv.Error as e:
            raise PromptFileError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None


def _csv_header(path: Path) -> list[str]:
    check_file(path, PromptFileError)
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [h.strip() for h in next(csv.reader(f), [])]


def _require_columns(path: Path, header: list[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise PromptFileError(f"{path}: line 1 (header): missing column(s) {missing}; header is {header}")


def _read_csv_columns(path: Path, source: str, text_col: str, meta_cols: Mapping[str, str]) -> list[Prompt]:
    """CSV with a fixed prompt column; ``meta_cols`` maps CSV column -> meta key (values stripped)."""
    _require_columns(path, _csv_header(path), [text_col, *meta_cols])
    prompts = []
    for index, line, row in _iter_csv(path):
        meta = {key: clean_text(row[col]) for col, key in meta_cols.items()}
        prompts.append(
            _make_prompt(row[text_col], source, row.get("id", index), meta, f"{path}: line {line}")
        )
    return prompts


def _read_csv(path: Path, source: str) -> list[Prompt]:
    """Generic CSV: the prompt column is the one named prompt/prompts/text/caption (any case); an ``id``
    column gives ids; all other columns go to ``meta`` under their header names."""
    header = _csv_header(path)
    candidates = [h for h in header if h.lower() in (*_TEXT_KEYS, "prompts")]
    if len(candidates) != 1:
        raise PromptFileError(
            f"{path}: line 1 (header): expected exactly one prompt column named prompt/prompts/text/caption, "
            f"header is {header}"
        )
    meta_cols = {h: h for h in header if h not in (candidates[0], "id")}
    return _read_csv_columns(path, source, candidates[0], meta_cols)


def _read_hrs(path: Path, source: str) -> list[Prompt]:
    """HRS-Bench generated prompt CSVs (eslambakr/HRS_benchmark, codes/prompt_gen/generated_prompts/).
    Counting files hold the prompt in ``synthetic_prompt``; their ``meta_prompt`` is the LLM instruction
    ("In one sentence, Describe a real scene about 2 cup."). Colour/size/spatial files leave
    ``synthetic_prompt`` empty and hold the prompt in ``meta_prompt``. So the column is chosen per file:
    ``synthetic_prompt`` if any row fills it (then every row must), else ``meta_prompt``."""
    _require_columns(path, _csv_header(path), ["meta_prompt"])
    rows = list(_iter_csv(path))
    text_col = (
        "synthetic_prompt"
        if any(r.get("synthetic_prompt", "").strip() for _, _, r in rows)
        else "meta_prompt"
    )
    prompts = []
    for index, line, row in rows:
        meta = {k: clean_text(v) for k, v in row.items() if k != text_col and v.strip()}
        prompts.append(_make_prompt(row[text_col], source, index, meta, f"{path}: line {line} ({text_col})"))
    return prompts


ReaderFn = Callable[[Path, str], list[Prompt]]

#: Format name -> reader. ``format="auto"`` picks one of these with :func:`sniff_format`.
PROMPT_FORMATS: dict[str, ReaderFn] = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "json": _read_json_records,
    "coco": _read_coco,
    "tifa": functools.partial(_read_json_records, text_keys=("caption",), id_key="id"),
    "multigen": functools.partial(_read_json_records, text_keys=("text",), id_key="unique_id"),
    "refl": functools.partial(_read_json_records, text_keys=("text",), id_key="image"),
    "imagereward": functools.partial(_read_json_records, text_keys=("prompt",), id_key="id"),
    "csv": _read_csv,
    "drawbench": functools.partial(_read_csv_columns, text_col="Prompts", meta_cols={"Category": "category"}),
    # ViLG-300 (ERNIE-ViLG 2.0): English prompt, Chinese text, Chinese category, origin benchmark.
    "vilg300": functools.partial(
        _read_csv_columns,
        text_col="Prompt",
        meta_cols={"文本": "text_zh", "类别": "category_zh", "来源": "origin"},
    ),
    "hrs": _read_hrs,
    "folder": _read_folder,
}

# Sniffing tables: first entry whose keys/columns are all present wins (more specific entries first).
_JSON_LIST_SIGNATURES: list[tuple[str, frozenset[str]]] = [
    ("tifa", frozenset({"id", "caption"})),
    ("multigen", frozenset({"unique_id", "text"})),
    ("refl", frozenset({"image", "text"})),
    ("imagereward", frozenset({"id", "prompt"})),
]
_CSV_SIGNATURES: list[tuple[str, frozenset[str]]] = [
    ("drawbench", frozenset({"Prompts", "Category"})),
    ("vilg300", frozenset({"Prompt", "文本"})),
    ("hrs", frozenset({"meta_prompt"})),
]


def _sniff_json(path: Path) -> str:
    data = load_json(path, PromptFileError)
    if isinstance(data, dict) and "annotations" in data:
        return "coco"
    if isinstance(data, list) and data and isinstance(data[0], dict):
        keys = set(data[0])
        for name, signature in _JSON_LIST_SIGNATURES:
            if signature <= keys:
                return name
        if sum(k in keys for k in _TEXT_KEYS) == 1:
            return "json"
        raise PromptFileError(
            f"{path}: cannot tell the prompt key of the JSON records (keys {sorted(keys)}); "
            f"pass format= one of {sorted(PROMPT_FORMATS)}"
        )
    raise PromptFileError(
        f"{path}: unrecognised JSON layout (expected a list of prompt objects or a COCO captions object)"
    )


def sniff_format(path: str | Path) -> str:
    """Guess the format name of ``path`` from its extension and (for .json/.csv) its content."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    check_file(path, PromptFileError)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _sniff_json(path)
    if suffix == ".csv":
        header = set(_csv_header(path))
        return next((name for name, sig in _CSV_SIGNATURES if sig <= header), "csv")
    if suffix in (".txt", ".jsonl"):
        return suffix[1:]
    raise PromptFileError(
        f"{path}: cannot infer the prompt format from extension {suffix!r}; "
        f"pass format= one of {sorted(PROMPT_FORMATS)}"
    )


def read_prompts(path: str | Path, format: str = "auto", source: str | None = None) -> list[Prompt]:
    """Read a prompt file (or DPG-style folder) into a list of prompts, in file order.

    Args:
        path: file or folder.
        format: ``"auto"`` or one of :data:`PROMPT_FORMATS`.
        source: set name stored in each prompt; default: the file stem (folder name for folders).
    """
    path = Path(path)
    if format == "auto":
        format = sniff_format(path)
    if format not in PROMPT_FORMATS:
        raise ValueError(
            f"unknown prompt format {format!r}; expected 'auto' or one of {sorted(PROMPT_FORMATS)}"
        )
    try:
        prompts = PROMPT_FORMATS[format](path, source or (path.name if path.is_dir() else path.stem))
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not prompts:
        raise PromptFileError(f"{path}: no prompts found (empty file or folder)")
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise PromptFileError(f"{path}: duplicate id {p.id!r}; ids must be unique within a file")
        seen.add(p.id)
    return prompts


# --------------------------------------------------------------------------------------------------------
# Configured sources and weighted mixing
# --------------------------------------------------------------------------------------------------------


@dataclass
class PromptSource:
    """One prompt set as given in a YAML config.

    Args:
        path: prompt file or folder.
        format: ``"auto"`` or a :data:`PROMPT_FORMATS` name.
        name: set name (``Prompt.source``); default: the file stem.
        weight: relative sampling probability of the whole set (independent of its size).
        limit: keep only the first ``limit`` prompts of the file.
    """

    path: str
    format: str = "auto"
    name: str | None = None
    weight: float = 1.0
    limit: int | None = None

    def __post_init__(self) -> None:  # refused where it is configured, before anything reads or writes
        check_limit(self.limit, f"prompt source {self.path}: limit")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"prompt source {self.path}: weight must be a finite number > 0, got {self.weight!r}")


def check_limit(value: int | None, what: str) -> None:
    """A ``limit`` keeps the first N items: N must be a whole number >= 1 (0 or -1 would silently drop prompts)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{what} must be a whole number >= 1 (or null for all), got {value!r}")


def load_prompt_sources(sources: Sequence[PromptSource]) -> tuple[list[Prompt], list[float]]:
    """Load and concatenate ``sources``; return the prompts and per-prompt sampling weights such that each
    source's total probability is proportional to its ``weight`` (weights sum to 1)."""
    if not sources:
        raise ValueError("no prompt sources given")
    total = sum(s.weight for s in sources)
    prompts: list[Prompt] = []
    weights: list[float] = []
    names: dict[str, str] = {}
    for s in sources:
        items = read_prompts(s.path, s.format, s.name)[: s.limit]
        name = items[0].source
        if name in names:
            raise ValueError(
                f"prompt sources {names[name]} and {s.path} share the set name {name!r}; "
                "give them distinct `name`s"
            )
        names[name] = s.path
        prompts.extend(items)
        weights.extend([s.weight / total / len(items)] * len(items))
    return prompts, weights


class PromptDataset(Dataset):
    """Map-style dataset over prompts; items are :class:`Prompt` objects."""

    def __init__(self, prompts: Sequence[Prompt]) -> None:
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]


def collate_prompts(batch: Sequence[Prompt]) -> dict[str, list[str]]:
    """Collate prompts into ``{"prompts": [...], "ids": [...], "sources": [...]}``."""
    return {
        "prompts": [p.text for p in batch],
        "ids": [p.id for p in batch],
        "sources": [p.source for p in batch],
    }
