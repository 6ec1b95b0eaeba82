"""``Float32Matmul``: TF32 for the float32 matrix products of a GPU run (evaluation and any fp32 weights)."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class Float32Matmul(Callback):
    """Sets ``torch.set_float32_matmul_precision`` for the run and puts the previous value back at its end.

    PyTorch computes float32 matrix products in full fp32 by default ("highest"); on Ampere and later GPUs "high"
    lets them use TF32 tensor cores (~10-bit mantissa inputs, fp32 accumulation), several times faster (PyTorch's
    documentation of ``torch.set_float32_matmul_precision``). It matters for what runs in float32 under
    ``bf16-mixed`` autocast's exceptions, the frozen experts and the evaluation callbacks' models, and for
    ``precision: 32`` runs. On CPU it changes nothing.

    Args:
        precision: ``high`` (TF32), ``medium`` (bf16 products) or ``highest`` (full fp32, as without the callback).
    """

    def __init__(self, precision: Literal["highest", "high", "medium"] = "high") -> None:
        if precision not in ("highest", "high", "medium"):
            raise ValueError(f"precision must be 'highest', 'high' or 'medium', got {precision!r}")
        self.precision = precision
        self._before: str | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.precision)
        if self.precision != self._before:
            rank_zero_info(f"float32 matrix products at precision {self.precision!r} (was {self._before!r})")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._before is not None:
            torch.set_float32_matmul_precision(self._before)
            self._before = None
