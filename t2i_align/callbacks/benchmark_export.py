"""Writes the images of a benchmark export (``t2i-align predict`` with
:class:`~t2i_align.datamodules.export.BenchmarkExportData`) into the benchmark's folder layout."""

from __future__ import annotations

import json

from lightning.pytorch.callbacks import BasePredictionWriter

from t2i_align.io import atomic_path, save_png


class BenchmarkWriter(BasePredictionWriter):
    """Writes the images of :class:`~t2i_align.datamodules.export.BenchmarkExportData` jobs (each file
    atomically: an interrupted export resumes by skipping finished files); when prediction ends, rank 0
    writes the layout's metadata and ``export.json`` (sampler settings, counts)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        from t2i_align.callbacks.evaluation import image_grid

        for path, images in zip(batch["paths"], prediction):
            if len(images) == 1:
                picture = images[0]
            else:
                side = int(round(len(images) ** 0.5))
                picture = image_grid(list(images.cpu()), columns=side, gap=0)
            save_png(picture, path)
            self.written += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        data = trainer.datamodule
        trainer.strategy.barrier()  # every rank's files are written
        if trainer.is_global_zero:
            data.layout.finalize(data.output_dir, data.prompts)
            info = {"layout": data.layout.name, "images_per_prompt": data.layout.images_per_prompt,
                    "prompts": data.source.path, "seed": data.seed, **data.sampling,
                    "files_skipped_as_existing": data.skipped, "files_written": len(data.jobs)}
            with atomic_path(data.output_dir / "export.json") as tmp:
                tmp.write_text(json.dumps(info, indent=2) + "\n")
