"""CoMat's ablation on ToyWorld (the paper's Tables 3-4): concept activation (CA), + fidelity preservation (FP),
+ attribute concentration (AC, with the ToyWorld segmenter: the judge itself, an oracle upper bound), + mixed
latents (ML, at three more settings of its range and ratio, which the paper does not give), each from the committed
base at the same budget of 400 updates, its stopping step chosen on the validation prompts, and compared with the base
on the evaluation prompts (how: :mod:`t2i_align.studies.val_stopping`)::

    python -m t2i_align.commands.toyworld_build .cache/toyworld --natural 2000 --natural-val 512
    python -m t2i_align.studies.comat_ablation --out experiments/results/toyworld_comat_ablation
"""

from __future__ import annotations

from t2i_align.studies.harness import TOYWORLD, Model
from t2i_align.studies.val_stopping import main, markdown  # noqa: F401  (this study's tables)

COMAT = ("configs/method/comat.yaml", TOYWORLD, "configs/experiment/toyworld_comat.yaml")
ABLATION = "configs/experiment/comat_ablation"
# each stack as its last file's header gives it; the run folder is the stack's trainer.default_root_dir
ARMS = {m.name: m for m in (
    Model("CA", (*COMAT, f"{ABLATION}/ca.yaml"), "runs/toyworld_comat_ca"),
    Model("CA+FP", (*COMAT, f"{ABLATION}/ca_fp.yaml"), "runs/toyworld_comat_ca_fp"),
    Model("CA+FP+AC", (*COMAT, f"{ABLATION}/ca_fp_ac.yaml"), "runs/toyworld_comat_ca_fp_ac"),
    Model("CA+FP+AC+ML", COMAT, "runs/toyworld_comat"),
    # the mixed latents' range and ratio (the paper gives neither), compared on the validation prompts
    Model("CA+FP+AC+ML (tau 100-400)", (*COMAT, f"{ABLATION}/ml_early.yaml"), "runs/toyworld_comat_ml_early"),
    Model("CA+FP+AC+ML (tau 600-900)", (*COMAT, f"{ABLATION}/ml_late.yaml"), "runs/toyworld_comat_ml_late"),
    Model("CA+FP+AC+ML (ratio 0.25)", (*COMAT, f"{ABLATION}/ml_ratio_025.yaml"), "runs/toyworld_comat_ml_ratio_025"),
)}

if __name__ == "__main__":
    main(ARMS, "experiments/results/toyworld_comat_ablation", 400, __doc__, "comat_ablation")
