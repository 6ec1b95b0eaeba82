"""Float32Matmul sets the fp32 matmul precision for the run only, and refuses an unknown value."""

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from t2i_align.callbacks import Float32Matmul


class Record(BoringModel):
    def training_step(self, batch, batch_idx):
        self.seen = torch.get_float32_matmul_precision()
        return super().training_step(batch, batch_idx)


def test_precision_holds_during_the_run_and_is_restored():
    before = torch.get_float32_matmul_precision()
    assert before == "highest"
    model = Record()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Float32Matmul("high")])
    trainer.fit(model)
    assert model.seen == "high" and torch.get_float32_matmul_precision() == before


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be"):
        Float32Matmul("tf32")
