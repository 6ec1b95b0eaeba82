"""ToyWorld: a synthetic compositional world with an exact judge.

``world`` (scenes, prompts, rendering) and ``splits`` (the data splits) are the world; ``experts`` the judge and
the models that read its images; ``pretraining`` how every model was trained; ``evaluation`` the metrics.
Commands: ``python -m t2i_align.commands.toyworld_{build,pretrain,evaluate,quality}``.
"""
