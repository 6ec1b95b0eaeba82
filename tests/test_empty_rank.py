"""A rank with nothing to do must not hang the others (issue 27, defect 4).

Lightning skips the evaluation / prediction loop of a rank whose loader is empty, end hooks included, and the
other ranks then wait forever in those hooks' collective calls (metric syncs, gathers, barriers). So every split
gives every rank the same number of items, at least one, padding short ranks with repeats that are marked
(``batch["padding"]``) and dropped by every metric and export.

Unit tests of the padding here; then two gloo processes on CPU through the CLI, each run under a timeout that
kills the whole process group, so that a hang fails instead of blocking: validation with one pair and an
evaluation callback with one prompt (the val loss and metrics equal a 1-process run's, each prompt counted
once), and a resumed benchmark export with one file left for two ranks (written once).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from t2i_align.callbacks.benchmark_export import BenchmarkWriter
from t2i_align.callbacks.evaluation import GenerativeEvaluation
from t2i_align.callbacks.multigen import MultiGenEvaluation
from t2i_align.cli import main as cli_main
from t2i_align.datamodules import PairSource, T2IDataModule
from t2i_align.datamodules.prompts import PromptSource
from t2i_align.datamodules.sampler import PaddedCollate, PaddedDataset, PaddingIndex, ShardSampler, real_rows
from t2i_align.lightning_modules.base import AlignmentModule
from tests.helpers import REPO_ROOT, RenderingModule

CONFIGS = Path(REPO_ROOT) / "configs"
TIMEOUT = 240  # seconds for one 2-process run (about 30-60 s on one core); a hang is killed and fails the test


# ------------------------------------------------------------------------------------------ the padding
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_sampler_pads_marks_and_never_drops(n, world):
    shards = [ShardSampler(n, world, r) for r in range(world)]
    parts = [list(s) for s in shards]
    lengths = {len(p) for p in parts}
    assert len(lengths) == 1 and lengths == {len(s) for s in shards}  # equal lengths on every rank
    assert lengths == ({-(-n // world)} if n else {0})  # at least one item each when there is any
    real = sorted(int(i) for p in parts for i in p if not isinstance(i, PaddingIndex))
    assert real == list(range(n))  # each index once as a real item: none dropped, none doubled
    repeats = [int(i) for p in parts for i in p if isinstance(i, PaddingIndex)]
    assert len(repeats) == len(shards[0]) * world - n and all(0 <= i < n for i in repeats)
    assert [s.padding for s in shards] == [[isinstance(i, PaddingIndex) for i in p] for p in parts]


def test_padding_of_one_item_on_two_ranks():
    assert [list(ShardSampler(1, 2, r)) for r in (0, 1)] == [[0], [0]]
    assert [ShardSampler(1, 2, r).padding for r in (0, 1)] == [[False], [True]]
    assert [ShardSampler(5, 2, r).padding for r in (0, 1)] == [[False] * 3, [False, False, True]]
    repeat = pickle.loads(pickle.dumps(PaddingIndex(3)))  # reaches DataLoader workers as a repeat
    assert isinstance(repeat, PaddingIndex) and repeat == 3 and [10, 11, 12, 13][repeat] == 13


@pytest.mark.parametrize("workers", [0, 1])
def test_padded_loader_marks_repeats_in_the_batch(workers):
    def collate(items):
        return {"ids": list(items)}

    batches = [list(DataLoader(PaddedDataset(["a", "b", "c"]), batch_size=2, sampler=ShardSampler(3, 2, r),
                               collate_fn=PaddedCollate(collate), num_workers=workers)) for r in (0, 1)]
    assert [[b["ids"] for b in rank] for rank in batches] == [[["a", "c"]], [["b", "a"]]]
    assert [[b["padding"].tolist() for b in rank] for rank in batches] == [[[False, False]], [[False, True]]]
    assert real_rows(batches[1][0]) == [0] and real_rows({"ids": [1, 2]}, 2) == [0, 1]


def test_validation_loaders_give_every_rank_a_marked_batch(tiny_pairs):
    dm = T2IDataModule(val_prompts=[PromptSource(_prompt_file(Path(tiny_pairs).parent))],
                       val_pairs=PairSource(tiny_pairs, limit=1), resolution=32, val_batch_size=4)
    seen = []
    for rank in (0, 1):
        dm.world_size, dm.rank = 2, rank
        prompts, pairs = dm.val_dataloader()
        seen.append(([b["padding"].tolist() for b in prompts], [b["padding"].tolist() for b in pairs],
                     [i for b in pairs for i in b["ids"]]))
    assert seen[0][1] == [[False]] and seen[1][1] == [[True]]  # the one pair, and its marked repeat
    assert seen[0][2] == seen[1][2]
    assert seen[0][0] == [[False]] and seen[1][0] == [[True]]


def _prompt_file(folder: Path) -> str:
    path = folder / "one_prompt.txt"
    if not path.exists():
        path.write_text("a red circle\n")
    return str(path)


# ------------------------------------------------------------------------------------------ consumers
class _Trainer(SimpleNamespace):
    """What GenerativeEvaluation.run reads of a trainer, for rank ``global_rank`` of ``world_size``."""

    def __init__(self, rank: int, world: int, root: str) -> None:
        super().__init__(global_rank=rank, world_size=world, is_global_zero=rank == 0, loggers=[], global_step=0,
                         default_root_dir=root, strategy=SimpleNamespace(reduce=lambda t, reduce_op=None: t))


class _Movable:
    """A detector stand-in that records where it was moved to and finds every object."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []

    def to(self, device):
        self.devices.append(torch.device(device))
        return self

    def found(self, images, labels):
        return [[True] * len(row) for row in labels]


class _LocalMultiGen(MultiGenEvaluation):
    def compute(self, trainer, pl_module):
        return {}  # this rank's counts stay in self.counts (a real run sums them over the ranks)


def test_evaluation_drops_repeats_and_moves_experts(tmp_path):
    prompts = tmp_path / "multigen.json"
    prompts.write_text(json.dumps([{"unique_id": 7, "text": "a photo of a red circle, a blue square", "num_objects": 2,
                                    "obj_1_attributes": ["red", "circle"], "obj_2_attributes": ["blue", "square"]}]))
    module = RenderingModule()
    counts = []
    for rank in (0, 1):  # rank 1 of 2 has only the repeat of the one item
        detector = _Movable()
        evaluation = _LocalMultiGen(str(prompts), detector=detector, log_samples=0, batch_size=4)
        module.generator.calls.clear()
        evaluation.run(_Trainer(rank, 2, str(tmp_path)), module)
        assert len(module.generator.calls) == 1  # both ranks generate a batch (of one item)
        assert detector.devices == [module.device]  # the expert follows the module, on every rank
        counts.append(evaluation.counts)
    assert counts[0][0] == 1 and counts[1].sum() == 0  # the prompt counted once, on rank 0


class _Keys(GenerativeEvaluation):
    def reset(self, pl_module):
        self.keys = []

    def update(self, images, items, pl_module):
        assert len(images) == len(items)
        self.keys += [it.key for it in items]

    def compute(self, trainer, pl_module):
        return {}


def test_evaluation_shares_are_equal_and_each_item_is_updated_once(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\ntwo green stars\na yellow triangle\na cyan circle\n")
    module, keys, batches = RenderingModule(), [], []
    for rank in range(3):
        evaluation = _Keys(prompts=[{"path": str(prompts)}], batch_size=1, log_samples=0)
        module.generator.calls.clear()
        evaluation.run(_Trainer(rank, 3, str(tmp_path)), module)
        keys += evaluation.keys
        batches.append(len(module.generator.calls))
    assert sorted(keys) == sorted(f"p/{i}/0" for i in range(5)) and batches == [2, 2, 2]


def test_export_writer_skips_repeated_jobs(tmp_path):
    writer = BenchmarkWriter()
    paths = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    batch = {"paths": paths, "padding": torch.tensor([False, True])}
    writer.write_on_batch_end(None, None, [torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)], None, batch, 0)
    assert writer.written == 1 and Path(paths[0]).exists() and not Path(paths[1]).exists()


def test_validation_loss_skips_repeats():
    calls = []

    def denoising_loss(pixels, captions, rng):
        calls.append(captions[0])
        return torch.tensor(float(len(calls)))

    stub = SimpleNamespace(seed=0, val_loss=MeanMetric(), generator=SimpleNamespace(denoising_loss=denoising_loss))
    batch = {"pixel_values": torch.zeros(2, 3, 8, 8), "captions": ["real", "repeat"], "ids": ["0", "0"],
             "padding": torch.tensor([False, True])}
    AlignmentModule.validation_step(stub, batch, 0)
    assert calls == ["real"] and stub.val_loss.update_count == 1


# ------------------------------------------------------------------------------------------ two processes
def run_cli(args: list[str], timeout: int = TIMEOUT) -> None:
    """``t2i-align ARGS`` in a new process group (Lightning starts rank 1 as a child), killed whole on timeout."""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "t2i_align.cli", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"hung: no result after {timeout} s (a rank waits for one that skipped its loop)\n{err[-3000:]}")
    assert proc.returncode == 0, err[-4000:]


class DumpValidation(L.Callback):
    """Per rank, the metrics of a ``validate`` run: ``<default_root_dir>/metrics/rank<r>.json``."""

    def on_validation_end(self, trainer, pl_module) -> None:
        folder = Path(trainer.default_root_dir) / "metrics"
        folder.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.endswith("/seconds")}
        (folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(metrics))


class CountingWriter(BenchmarkWriter):
    """BenchmarkWriter that records, per rank, how many files it wrote: ``<default_root_dir>/written_rank<r>.json``."""

    def on_predict_end(self, trainer, pl_module) -> None:
        Path(trainer.default_root_dir, f"written_rank{trainer.global_rank}.json").write_text(json.dumps(self.written))
        super().on_predict_end(trainer, pl_module)


def validate_args(tiny_sd, tiny_pairs, root: Path, prompts: Path, multigen: Path, extra=()) -> list[str]:
    root.mkdir(parents=True)
    shared = {"sampling": {"num_inference_steps": 2, "guidance_scale": 3.0}, "batch_size": 2}
    callbacks = [
        {"class_path": "tests.helpers.RecordEvaluation",
         "init_args": {"out_dir": str(root / "eval"), "prompts": [{"path": str(prompts)}], "log_samples": 2, **shared}},
        {"class_path": "t2i_align.callbacks.multigen.MultiGenEvaluation",
         "init_args": {"prompt_file": str(multigen), "log_samples": 0, **shared,
                       "detector": {"class_path": "t2i_align.toyworld.experts.segmenter.ToyDetector"}}},
        {"class_path": "tests.test_empty_rank.DumpValidation"},
    ]
    config = root / "callbacks.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"logger": False, "enable_progress_bar": False, "callbacks": callbacks}}))
    stack = ["trainer/cpu.yaml", "method/finetune.yaml", "model/tiny.yaml", "data/tiny_pairs.yaml"]
    return ["validate", *[a for name in stack for a in ("--config", str(CONFIGS / name))], "--config", str(config),
            f"--model.init_args.generator.pretrained={tiny_sd}", f"--data.init_args.train_pairs.path={tiny_pairs}",
            f"--data.init_args.val_pairs.path={tiny_pairs}", "--data.init_args.val_pairs.limit=1",
            f"--trainer.default_root_dir={root}", *extra]


@pytest.mark.ddp
def test_validation_and_evaluation_smaller_than_the_world(tiny_sd, tiny_pairs, tmp_path):
    """One validation pair and one evaluation prompt on two ranks: validation completes on both, the val loss and
    the metrics equal one process's, and the prompt is generated, scored and logged once."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle next to a blue square\n")
    multigen = tmp_path / "multigen.json"
    multigen.write_text(json.dumps([{"unique_id": 0, "text": "a photo of a red circle, a blue square",
                                     "num_objects": 2, "obj_1_attributes": ["red", "circle"],
                                     "obj_2_attributes": ["blue", "square"]}]))
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run_cli(validate_args(tiny_sd, tiny_pairs, ddp, prompts, multigen,
                          ["--trainer.strategy=ddp", "--trainer.devices=2"]))
    cli_main(validate_args(tiny_sd, tiny_pairs, single, prompts, multigen))

    rows = [json.loads((ddp / "metrics" / f"rank{r}.json").read_text()) for r in (0, 1)]
    want = json.loads((single / "metrics" / "rank0.json").read_text())
    assert rows[0] == rows[1]  # every rank validated and logs the same numbers
    assert set(rows[0]) == set(want) and {"val/denoise_loss", "val/record/images", "val/multigen_multigen/mg2"} <= set(want)
    for key, value in want.items():
        assert rows[0][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert rows[0]["val/record/images"] == 1.0  # the one prompt, once (not once per rank)
    passes = [json.loads((ddp / "eval" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert passes == [[["prompts/0/0"]], [[]]]  # rank 1 generated the repeat but scored nothing
    assert (ddp / "samples" / "record" / "step_0.png").exists()


def predict_args(tiny_sd, prompts: Path, out: Path, extra=()) -> list[str]:
    return ["predict", "--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(CONFIGS / "method/finetune.yaml"),
            "--config", str(CONFIGS / "model/tiny.yaml"), f"--model.init_args.generator.pretrained={tiny_sd}",
            "--data.class_path=t2i_align.datamodules.BenchmarkExportData", f"--data.init_args.prompts.path={prompts}",
            "--data.init_args.layout=t2i_compbench", f"--data.init_args.output_dir={out}",
            "--data.init_args.images_per_prompt=1", "--data.init_args.sampling.num_inference_steps=2",
            "--data.init_args.batch_size=2", "--trainer.callbacks+=tests.test_empty_rank.CountingWriter",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--return_predictions=false", *extra]


@pytest.mark.ddp
def test_resumed_export_with_fewer_files_than_ranks(tiny_sd, tmp_path):
    prompts = tmp_path / "color_val.txt"
    prompts.write_text("a red car\na blue bowl\n")
    out = tmp_path / "export"
    cli_main(predict_args(tiny_sd, prompts, out, [f"--trainer.default_root_dir={tmp_path / 'first'}"]))
    files = sorted((out / "samples").iterdir())
    assert [f.name for f in files] == ["a blue bowl_000001.png", "a red car_000000.png"]
    kept = files[0].stat().st_mtime_ns
    files[1].unlink()  # as if interrupted before this file: one job left for two ranks

    root = tmp_path / "resumed"
    run_cli(predict_args(tiny_sd, prompts, out, [f"--trainer.default_root_dir={root}", "--trainer.strategy=ddp",
                                                 "--trainer.devices=2"]))
    written = [json.loads((root / f"written_rank{r}.json").read_text()) for r in (0, 1)]
    assert written == [1, 0]  # the one file, written once (rank 1 rendered its repeat and dropped it)
    assert files[1].exists() and files[0].stat().st_mtime_ns == kept
    info = json.loads((out / "export.json").read_text())
    assert info["complete"] and info["files_written"] == 1 and info["files_skipped_as_existing"] == 1
