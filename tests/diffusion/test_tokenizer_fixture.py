"""The committed tiny CLIP tokenizer fixture (t2i_align/diffusion/assets/tiny_clip_tokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from t2i_align.diffusion.assets import TINY_TOKENIZER_DIR
from t2i_align.diffusion.assets.build_tokenizer import BOS, EOS, NUM_MERGES, base_symbols, write_tokenizer

FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
VOCAB_SIZE = 512 + NUM_MERGES + 2


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)


def test_files_present_and_small() -> None:
    sizes = {name: (TINY_TOKENIZER_DIR / name).stat().st_size for name in FILES}
    assert sum(sizes.values()) < 100_000, sizes


def test_loads_with_vocab_size(tok: CLIPTokenizer) -> None:
    vocab = json.loads((TINY_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE
    assert tok.vocab_size == len(tok) == VOCAB_SIZE
    assert 1000 <= VOCAB_SIZE <= 2000
    assert tok.model_max_length == 77


def test_clip_vocab_layout() -> None:
    vocab = json.loads((TINY_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (TINY_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    merges = [tuple(line.split(" ")) for line in lines[1:]]
    assert len(merges) == NUM_MERGES
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert tokens[:512] == base_symbols()  # 256 byte symbols, then the same with </w>
    for i, (a, b) in enumerate(merges):  # one token per merge, in merge order, parts defined before
        assert vocab[a + b] == 512 + i
        assert vocab[a] < 512 + i and vocab[b] < 512 + i


def test_special_tokens_are_last_two(tok: CLIPTokenizer) -> None:
    assert tok.bos_token == BOS and tok.eos_token == EOS
    assert (tok.bos_token_id, tok.eos_token_id) == (VOCAB_SIZE - 2, VOCAB_SIZE - 1)
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.unk_token_id == tok.eos_token_id  # as in openai/clip-vit-*


def test_round_trip_decode(tok: CLIPTokenizer) -> None:
    ids = tok("A  red cube on the LEFT of\ta blue ball").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a red cube on the left of a blue ball"


def test_unknown_words_use_byte_fallback(tok: CLIPTokenizer) -> None:
    text = "a zebracorn in the café 🙂 naïve"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert len(tok("zebracorn", add_special_tokens=False).input_ids) >= 2
    assert tok.decode(ids) == text


def test_truncation_and_padding_to_77(tok: CLIPTokenizer) -> None:
    long = tok(" ".join(["red cube"] * 60), padding="max_length", max_length=77, truncation=True)
    assert len(long.input_ids) == 77
    assert long.input_ids[0] == tok.bos_token_id and long.input_ids[76] == tok.eos_token_id
    assert tok.eos_token_id not in long.input_ids[1:76]
    short = tok("a cat", padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert len(short.input_ids) == 77
    assert short.input_ids[3:] == [tok.eos_token_id] * 74  # <sot> a cat <eot> <pad=eot>...


def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name


def test_save_and_load_as_pipeline_subfolder(tok: CLIPTokenizer, tmp_path: Path) -> None:
    text = "two tiny zebracorns behind a RED box."
    tok.save_pretrained(tmp_path / "saved" / "tokenizer")
    shutil.copytree(TINY_TOKENIZER_DIR, tmp_path / "hub" / "tokenizer")  # SD 1.x hub layout
    for root in ("saved", "hub"):
        loaded = CLIPTokenizer.from_pretrained(tmp_path / root, subfolder="tokenizer")
        assert len(loaded) == VOCAB_SIZE and loaded.model_max_length == 77
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
            tok.bos_token_id,
            tok.eos_token_id,
            tok.pad_token_id,
        )
        assert loaded(text).input_ids == tok(text).input_ids
