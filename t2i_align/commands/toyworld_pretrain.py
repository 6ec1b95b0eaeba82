"""Reproduce every pretrained ToyWorld model from a seed (stages: :mod:`t2i_align.toyworld.pretraining.stages`):
``python -m t2i_align.commands.toyworld_pretrain WORK_DIR --out models/toyworld [--device cuda] [--stages ...]``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from t2i_align.toyworld.pretraining import stages


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=stages.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path, help="working folder for stage checkpoints")
    p.add_argument("--out", type=Path, default=Path("models/toyworld"))
    p.add_argument("--stages", nargs="*", default=list(stages.STAGES), choices=stages.STAGES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-workers", type=int, default=0, help="render workers per stage (use them on a GPU)")
    for stage, n in stages.DEFAULT_STEPS.items():
        p.add_argument(f"--{stage}-steps", type=int, default=n)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    steps = {stage: getattr(a, f"{stage}_steps") for stage in stages.DEFAULT_STEPS}
    if steps["text"] > steps["clip"]:
        p.error("--text-steps must not exceed --clip-steps (the text encoder is a snapshot of the CLIP run)")
    stages.run(a.work, a.out, a.stages, steps, a.seed, a.device, a.num_workers)



if __name__ == "__main__":
    main()
