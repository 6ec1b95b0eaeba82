"""Word -> CLIP token position alignment (t2i_align/diffusion/tokens.py)."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import CLIPTokenizer

from t2i_align.diffusion.assets import TINY_TOKENIZER_DIR
from t2i_align.diffusion.tokens import WordTokens, align_words, find_phrase, load_spacy, word_spans


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def nlp() -> Any:
    return load_spacy()


def encoder_ids(tok: CLIPTokenizer, prompt: str) -> list[int]:
    """input_ids exactly as the text encoder sees them."""
    return tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids


def check_words(tok: CLIPTokenizer, prompt: str, words: list[WordTokens]) -> None:
    """Invariants + an independent check: each word tokenized alone gives the ids at its positions."""
    ids = encoder_ids(tok, prompt)
    flat = [p for w in words for p in w.positions]
    assert flat == sorted(flat) and len(set(flat)) == len(flat)  # increasing, never reused
    assert all(1 <= p <= tok.model_max_length - 2 for p in flat)  # never the start/end token
    for w in words:
        assert prompt[w.start : w.end] == w.word
        if not w.truncated:
            alone = tok(w.word, add_special_tokens=False).input_ids
            assert [ids[p] for p in w.positions] == alone, w


def test_repeated_words(tok: CLIPTokenizer) -> None:
    prompt = "a red cube and a red ball"
    words = align_words(prompt, tok)
    assert [w.word for w in words] == prompt.split()
    reds = [w for w in words if w.word == "red"]
    assert reds[0].positions != reds[1].positions
    assert words[0].positions[0] == 1  # position 0 is <|startoftext|>
    assert [w.positions for w in words] == [(1,), (2,), (3,), (4,), (5,), (6,), (7,)]
    check_words(tok, prompt, words)


@pytest.mark.parametrize("word", ["zebracorn", "trianlge", "café"])
def test_multi_piece_word(tok: CLIPTokenizer, word: str) -> None:
    prompt = f"a {word} next to a blue cube"
    words = align_words(prompt, tok)
    target = words[1]
    assert target.word == word and len(target.positions) >= 2
    ids = encoder_ids(tok, prompt)
    assert tok.decode([ids[p] for p in target.positions]) == word
    assert words[2].positions[0] == target.positions[-1] + 1
    check_words(tok, prompt, words)


def test_first_word_at_position_one_after_leading_junk(tok: CLIPTokenizer) -> None:
    assert [w.positions for w in align_words(" \t A cat", tok)] == [(1,), (2,)]
    words = align_words('"A cat"', tok)
    assert [(w.word, w.positions) for w in words] == [("A", (2,)), ("cat", (3,))]  # '"' is position 1


def test_truncation(tok: CLIPTokenizer) -> None:
    single = ["red", "cube", "blue", "ball"]
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in single)
    prompt = " ".join(single[i % 4] for i in range(100))
    words = align_words(prompt, tok)
    assert len(words) == 100
    for i, w in enumerate(words):
        if i < 75:
            assert w.positions == (i + 1,) and not w.truncated
        else:
            assert w.positions == () and w.truncated
    assert all(76 not in w.positions for w in words)
    assert encoder_ids(tok, prompt)[76] == tok.eos_token_id
    check_words(tok, prompt, words)


def test_word_cut_by_truncation_keeps_surviving_pieces(tok: CLIPTokenizer) -> None:
    prompt = " ".join(["red"] * 74) + " zebracorn cube"
    words = align_words(prompt, tok)
    cut, last = words[74], words[75]
    assert cut.word == "zebracorn" and cut.positions == (75,) and cut.truncated
    assert last.positions == () and last.truncated
    assert not words[73].truncated
    check_words(tok, prompt, words)


def test_punctuation_and_uppercase(tok: CLIPTokenizer) -> None:
    prompt = "A RED circle, left of a blue square."
    words = align_words(prompt, tok)
    assert [w.word for w in words] == ["A", "RED", "circle", "left", "of", "a", "blue", "square"]
    assert words[1].word == "RED" and (words[1].start, words[1].end) == (2, 5)
    # Same positions as the lower-cased prompt; the comma (position 4) belongs to no word.
    assert [w.positions for w in words] == [w.positions for w in align_words(prompt.lower(), tok)]
    assert words[2].positions == (3,) and words[3].positions == (5,)
    check_words(tok, prompt, words)


def test_offsets_refer_to_original_string_with_odd_whitespace(tok: CLIPTokenizer) -> None:
    messy = "  A  red\tcube\n\nand   a RED ball "
    clean = "a red cube and a red ball"
    words = align_words(messy, tok)
    assert [w.word for w in words] == ["A", "red", "cube", "and", "a", "RED", "ball"]
    assert [w.positions for w in words] == [w.positions for w in align_words(clean, tok)]
    check_words(tok, messy, words)


def test_find_phrase(tok: CLIPTokenizer) -> None:
    prompt = "a red circle and a blue square and a Red  Circle"
    assert find_phrase(prompt, "red circle", tok) == (2, 3)
    assert find_phrase(prompt, "RED circle", tok, occurrence=1) == (10, 11)
    assert find_phrase(prompt, "square", tok) == (7,)
    assert find_phrase(prompt, "a", tok, occurrence=2) == (9,)  # whole words only, not inside "and"
    with pytest.raises(ValueError, match="green.*a red circle"):
        find_phrase(prompt, "green", tok)
    with pytest.raises(ValueError, match="occurrence 2"):
        find_phrase(prompt, "red circle", tok, occurrence=2)


def test_spacy_path_matches_regex_path(tok: CLIPTokenizer, nlp: Any) -> None:
    prompt = "A red cube on the left of two blue balls."
    assert word_spans(prompt, nlp) == word_spans(prompt)
    via_spacy = align_words(prompt, tok, nlp=nlp)
    assert via_spacy == align_words(prompt, tok)
    check_words(tok, prompt, via_spacy)


def test_spacy_contraction_split_inside_a_piece(tok: CLIPTokenizer, nlp: Any) -> None:
    # spaCy splits "don't" into "do" + "n't"; the tiny vocab gives pieces "d" "on</w>" "'" "t</w>".
    # The piece "on" straddles both words and goes to the first one only.
    prompt = "i don't see a cat"
    assert tok.convert_ids_to_tokens(encoder_ids(tok, prompt)[2:6]) == ["d", "on</w>", "'", "t</w>"]
    words = align_words(prompt, tok, nlp=nlp)
    assert [(w.word, w.positions) for w in words] == [
        ("i", (1,)), ("do", (2, 3)), ("n't", (4, 5)), ("see", (6, 7)), ("a", (8,)), ("cat", (9,))
    ]


def test_load_spacy_falls_back_to_offline_package() -> None:
    import spacy

    try:
        spacy.load("en_core_web_sm")
    except OSError:
        pass
    else:
        pytest.skip("en_core_web_sm is installed, the fallback is not exercised")
    nlp = load_spacy("en_core_web_sm")
    assert nlp is load_spacy("en_core_web_sm")  # cached
    assert "parser" in nlp.pipe_names
    assert [t.pos_ for t in nlp("a red cube")] == ["DET", "ADJ", "NOUN"]
    with pytest.raises(OSError, match="spacy download"):
        load_spacy("xx_no_such_model")


class _NoOffsets:
    """A tokenizer without offsets mapping (like transformers 4.x's slow CLIPTokenizer)."""

    is_fast = False

    def __init__(self, tok: CLIPTokenizer) -> None:
        self._tok = tok
        self.model_max_length = tok.model_max_length
        self.all_special_ids = tok.all_special_ids

    def __call__(self, text: str, **kwargs: Any) -> Any:
        if kwargs.pop("return_offsets_mapping", False):
            raise NotImplementedError("no offsets")
        return self._tok(text, **kwargs)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self._tok.convert_ids_to_tokens(ids)


@pytest.mark.parametrize(
    "prompt",
    [
        "a red cube and a red ball",
        "  A RED circle, left of a blue square.",
        "it's a zebracorn in the café 🙂 naïve trianlge",
        " ".join(["red"] * 74) + " zebracorn cube",
    ],
)
def test_piece_assembly_fallback_matches_offsets(tok: CLIPTokenizer, prompt: str) -> None:
    assert align_words(prompt, _NoOffsets(tok)) == align_words(prompt, tok)


def test_rejects_overlapping_spans(tok: CLIPTokenizer) -> None:
    with pytest.raises(ValueError, match="non-overlapping"):
        align_words("a red cube", tok, spans=[(0, 5), (2, 10)])
