"""Lightning callbacks: checkpoints, weight export, EMA of the trainable weights; evaluation callbacks live in
their own modules."""

from t2i_align.callbacks.checkpoint import SaveOnSigterm, StepCheckpoint
from t2i_align.callbacks.ema import TrainableEMA
from t2i_align.callbacks.export import ExportWeights
from t2i_align.callbacks.matmul import Float32Matmul

__all__ = ["ExportWeights", "Float32Matmul", "SaveOnSigterm", "StepCheckpoint", "TrainableEMA"]
