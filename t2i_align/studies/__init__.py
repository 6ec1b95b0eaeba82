"""ToyWorld studies: each a short declaration of the models it compares, on one harness.

* :mod:`~t2i_align.studies.harness`: models (a name, a ``--config`` stack, a run folder, a checkpoint; the base
  once), training, finding checkpoints, and the one cached evaluation pass.
* :mod:`~t2i_align.studies.report`: the one results layout (JSON + Markdown) and the paired comparisons.

The studies, each run from the repository root as ``python -m t2i_align.studies.<name> --help``:

* ``compare_methods``       Finetune, ReFL (two rewards) and ARL at one budget against the base
* ``comat_ablation``        CoMat's parts, each stopping step chosen on validation prompts
* ``tokencompose_compare``  TokenCompose against whole-UNet Finetune, the same way
* ``fine_stage_compare``    RealignDiff's fine stage on the base and on the best coarse-stage model
* ``val_stopping``          the kind of study of the two above (training with validation curves, choosing the step)
"""
