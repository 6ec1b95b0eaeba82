"""Pretraining of every ToyWorld model from a seed: on-the-fly batches and the shared loop (``batches``), the
Stable Diffusion parts (``sd``) and the stage runner (``stages``)."""
