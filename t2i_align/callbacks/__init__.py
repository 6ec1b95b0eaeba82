"""Lightning callbacks: weight export (evaluation callbacks come with the evaluation issue)."""

from t2i_align.callbacks.export import ExportWeights

__all__ = ["ExportWeights"]
