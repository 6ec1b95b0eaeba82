"""TokenCompose against Finetune on ToyWorld in TokenCompose's setting (the paper's claim: multi-category instance
composition improves, MG3/MG4 and object accuracy on multi-object prompts, while image quality is kept): both train
the whole UNet on the COCO-like pairs (2-4 objects per image; TokenCompose with their rendered masks: exact, so an
upper bound of an annotation pipeline) at lr 1e-5 with 10 % empty captions (``toyworld_*_coco.yaml``), the same
pairs, seeds and budget; each stopping step is chosen on the validation prompts and the chosen checkpoints are
compared with the base on the evaluation prompts (how: :mod:`t2i_align.studies.val_stopping`)::

    python -m t2i_align.commands.toyworld_build .cache/toyworld --natural 2000 --natural-val 512
    python -m t2i_align.studies.tokencompose_compare --out experiments/results/toyworld_tokencompose
"""

from __future__ import annotations

from t2i_align.studies.harness import FINETUNE, TOYWORLD, Model
from t2i_align.studies.val_stopping import main, markdown  # noqa: F401  (this study's tables)

# each stack as its last file's header gives it; the run folder is the stack's trainer.default_root_dir
ARMS = {m.name: m for m in (
    Model("Finetune (whole UNet)", (FINETUNE, TOYWORLD, "configs/experiment/toyworld_finetune_full.yaml",
                                    "configs/experiment/toyworld_finetune_coco.yaml"), "runs/toyworld_finetune_coco"),
    Model("TokenCompose", ("configs/method/tokencompose.yaml", TOYWORLD, "configs/experiment/toyworld_tokencompose.yaml",
                           "configs/experiment/toyworld_tokencompose_coco.yaml"), "runs/toyworld_tokencompose_coco"),
    # the positive control: grounding losses at 100x the paper's weights (does grounding, once moved, move alignment?)
    Model("TokenCompose (losses x100, a control)", ("configs/method/tokencompose.yaml", TOYWORLD,
                                                    "configs/experiment/toyworld_tokencompose.yaml",
                                                    "configs/experiment/toyworld_tokencompose_coco.yaml",
                                                    "configs/experiment/toyworld_tokencompose_strong.yaml"),
          "runs/toyworld_tokencompose_strong"),
)}

if __name__ == "__main__":
    main(ARMS, "experiments/results/toyworld_tokencompose", 1000, __doc__, "tokencompose_compare")
