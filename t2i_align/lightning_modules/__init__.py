"""Methods: one LightningModule per file on top of :class:`~t2i_align.lightning_modules.base.AlignmentModule`."""

from t2i_align.lightning_modules.arl import ARL
from t2i_align.lightning_modules.base import AlignmentModule
from t2i_align.lightning_modules.comat import CoMat
from t2i_align.lightning_modules.fine_stage import FineStage
from t2i_align.lightning_modules.finetune import Finetune
from t2i_align.lightning_modules.refl import ReFL
from t2i_align.lightning_modules.tokencompose import TokenCompose

__all__ = ["ARL", "AlignmentModule", "CoMat", "FineStage", "Finetune", "ReFL", "TokenCompose"]
