"""TokenCompose against Finetune on ToyWorld (the paper's claim: multi-category instance composition improves, MG3/MG4
and object accuracy on multi-object prompts, while image quality is kept): both train the whole UNet at lr 1e-4 on
the natural pairs (TokenCompose with their rendered masks: exact, so an upper bound of an annotation pipeline), the
same pairs, seeds and budget; each stopping step is chosen on the validation prompts and the chosen checkpoints are
compared with the base on the evaluation prompts (how: ``val_stopping.py``)::

    python -m t2i_align.commands.toyworld_build .cache/toyworld --natural 2000 --natural-val 512
    python experiments/toyworld/tokencompose_compare.py --out experiments/results/toyworld_tokencompose
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from val_stopping import main  # noqa: E402  (the sibling script)

TOYWORLD = "configs/experiment/toyworld.yaml"
# name -> (--config stack as the last file's header gives it, run folder = the stack's default_root_dir)
ARMS = {
    "Finetune (whole UNet)": (["configs/method/finetune.yaml", TOYWORLD, "configs/experiment/toyworld_finetune_full.yaml"],
                              "runs/toyworld_finetune_full"),
    "TokenCompose": (["configs/method/tokencompose.yaml", TOYWORLD, "configs/experiment/toyworld_tokencompose.yaml"],
                     "runs/toyworld_tokencompose"),
}

if __name__ == "__main__":
    main(ARMS, "experiments/results/toyworld_tokencompose", 1000, __doc__)
