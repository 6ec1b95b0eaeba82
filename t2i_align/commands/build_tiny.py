"""Build the tiny demo inputs: ``python -m t2i_align.commands.build_tiny OUT`` writes ``OUT/sd`` (a random-weight SD
pipeline folder) and ``OUT/pairs`` (synthetic coloured-shape pairs with masks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from t2i_align.datamodules.synthetic import write_shape_pairs
from t2i_align.diffusion.tiny import save_tiny_pipeline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=64, help="number of synthetic image-caption pairs")
    args = parser.parse_args(argv)
    save_tiny_pipeline(args.out / "sd", seed=args.seed)
    write_shape_pairs(args.out / "pairs", count=args.pairs, size=32, seed=args.seed)
    print(f"wrote {args.out / 'sd'} and {args.out / 'pairs' / 'metadata.jsonl'}")


if __name__ == "__main__":
    main()
