"""Rebuild the tiny CLIP-format tokenizer fixture (:mod:`t2i_align.diffusion.assets.build_tokenizer`):
``python -m t2i_align.commands.build_tiny_tokenizer OUT_DIR [--num-merges N]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from t2i_align.diffusion.assets.build_tokenizer import NUM_MERGES, write_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-merges", type=int, default=NUM_MERGES)
    args = parser.parse_args(argv)
    out = write_tokenizer(args.out_dir, args.num_merges)
    print(f"wrote {out} ({args.num_merges + 514} tokens)")


if __name__ == "__main__":
    main()
