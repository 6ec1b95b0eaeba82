"""Commands other than ``t2i-align fit|validate|test|predict`` (:mod:`t2i_align.cli`), each run as
``python -m t2i_align.commands.<name> --help``:

* ``build_tiny``         random-weight tiny SD pipeline + synthetic pairs (the tiny demo's inputs)
* ``build_tiny_tokenizer`` the committed tiny CLIP tokenizer fixture, rebuilt
* ``annotate_masks``     TokenCompose's per-noun masks for a pair file (Grounded-SAM)
* ``comat_cache``        CoMat's real latents computed ahead (the training run's config stack)
* ``fid_reference``      FID reference statistics computed ahead (sharded over ranks, resumable)
* ``multigen``           MultiGen MG_k of exported images
* ``toyworld_build``     ToyWorld's data splits
* ``toyworld_pretrain``  every pretrained ToyWorld model, from a seed
* ``toyworld_evaluate``  a pipeline folder (+ LoRA) judged on ToyWorld prompts
* ``toyworld_quality``   ToyWorld's quality bars

"""
