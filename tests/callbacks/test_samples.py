"""Sample logging of the evaluation callbacks: a grid file and a table of (prompt, seed, image, scores)."""

import lightning as L
import torch
from lightning.pytorch.loggers.logger import Logger

from t2i_align.diffusion.sampling import SamplingSettings
from tests.helpers import RecordEvaluation, RenderingModule


class TableLogger(Logger):
    """Captures what a W&B logger would receive."""

    def __init__(self) -> None:
        super().__init__()
        self.tables, self.params = [], []

    name, version = "table", 0

    @property
    def experiment(self):
        return self

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        self.params.append(params)

    def log_table(self, key, columns=None, data=None, step=None):
        self.tables.append((key, columns, data, step))


Module = RenderingModule


def test_samples_grid_and_table(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green star\n")
    callback = RecordEvaluation(str(tmp_path / "rec"), prompts=[{"path": str(prompts)}], images_per_prompt=2,
                                batch_size=4, log_samples=5, sampling=SamplingSettings(3))
    logger = TableLogger()
    trainer = L.Trainer(accelerator="cpu", logger=logger, callbacks=[callback], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(Module(), dataloaders=torch.utils.data.DataLoader([0]))
    assert (tmp_path / "samples" / "record" / "step_0.png").exists()
    (key, columns, rows, step), = logger.tables
    assert key == "samples/record" and columns == ["prompt", "seed", "image", "mean"]
    items = callback.items[:5]
    assert [r[0] for r in rows] == [it.prompt for it in items] and [r[1] for r in rows] == [it.seed for it in items]
    assert all(0 < r[3] < 1 for r in rows)
    settings = logger.params[0]["eval/record"]
    assert settings["num_inference_steps"] == 3 and settings["items"] == 6
