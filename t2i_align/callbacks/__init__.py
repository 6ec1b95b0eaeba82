"""Lightning callbacks: LoRA export (evaluation callbacks come with the evaluation issue)."""

from t2i_align.callbacks.lora_export import ExportLoRA

__all__ = ["ExportLoRA"]
