"""CoMat's ablation on ToyWorld (the paper's Tables 3-4): concept activation (CA), + fidelity preservation (FP),
+ attribute concentration (AC, with the ToyWorld segmenter: the judge itself, an oracle upper bound), + mixed
latents (ML), each from the committed base at the same budget, its stopping step chosen on the validation prompts,
and compared with the base on the evaluation prompts (how: ``val_stopping.py``)::

    python -m t2i_align.commands.toyworld_build .cache/toyworld --natural 2000 --natural-val 512
    python experiments/toyworld/comat_ablation.py --out experiments/results/toyworld_comat_ablation
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from val_stopping import main  # noqa: E402  (the sibling script)

COMAT = ["configs/method/comat.yaml", "configs/experiment/toyworld.yaml", "configs/experiment/toyworld_comat.yaml"]
ABLATION = "configs/experiment/comat_ablation"
# name -> (--config stack as the last file's header gives it, run folder = the stack's default_root_dir)
ARMS = {
    "CA": ([*COMAT, f"{ABLATION}/ca.yaml"], "runs/toyworld_comat_ca"),
    "CA+FP": ([*COMAT, f"{ABLATION}/ca_fp.yaml"], "runs/toyworld_comat_ca_fp"),
    "CA+FP+AC": ([*COMAT, f"{ABLATION}/ca_fp_ac.yaml"], "runs/toyworld_comat_ca_fp_ac"),
    "CA+FP+AC+ML": (COMAT, "runs/toyworld_comat"),
}

if __name__ == "__main__":
    main(ARMS, "experiments/results/toyworld_comat_ablation", 100, __doc__)
