"""CoMat: the method (``method``), its latent discriminator (``discriminator``) and the file format of its cache of
real latents (``real_latents``)."""

from t2i_align.lightning_modules.comat.method import CoMat

__all__ = ["CoMat"]
