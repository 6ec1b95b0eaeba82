"""Small committed assets (a tiny CLIP-format tokenizer for tests and demo models)."""

from pathlib import Path

# Built by `python -m t2i_align.commands.build_tiny_tokenizer` (see that module).
TINY_TOKENIZER_DIR: Path = Path(__file__).resolve().parent / "tiny_clip_tokenizer"

__all__ = ["TINY_TOKENIZER_DIR"]
