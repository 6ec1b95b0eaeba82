"""Writes the images of a benchmark export (``t2i-align predict`` with
:class:`~t2i_align.datamodules.export.BenchmarkExportData`) into the benchmark's folder layout."""

from __future__ import annotations

from lightning.pytorch.callbacks import BasePredictionWriter

from t2i_align.datamodules.sampler import real_rows
from t2i_align.io import save_png


class BenchmarkWriter(BasePredictionWriter):
    """Writes the images of :class:`~t2i_align.datamodules.export.BenchmarkExportData` jobs, each file
    atomically (an interrupted export resumes by skipping finished files; the datamodule checks that the
    folder's recipe matches first). A job repeated to give a rank work (``batch["padding"]``) is not written again
    nor counted in ``written``. When prediction ends, rank 0 writes the layout's metadata and completes
    ``export.json`` with the counts."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.written = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        # The images are on disk: do not also keep every image of the export in memory (predict's default).
        trainer.predict_loop.return_predictions = False

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        from t2i_align.callbacks.evaluation import image_grid

        # a job repeated only so that this rank has work (batch["padding"]) is another rank's file to write
        for i in real_rows(batch, len(batch["paths"])):
            path, images = batch["paths"][i], prediction[i]
            if len(images) == 1:
                picture = images[0]
            else:
                side = int(round(len(images) ** 0.5))
                picture = image_grid(list(images.cpu()), columns=side, gap=0)
            save_png(picture, path)
            self.written += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier()  # every rank's files are written
        if trainer.is_global_zero:
            trainer.datamodule.finish()
