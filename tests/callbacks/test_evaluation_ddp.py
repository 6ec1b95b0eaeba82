"""Evaluation callbacks inside a 2-process CPU DDP fit: an odd number of prompts, each generated and scored
exactly once, identical metrics on both ranks and equal to a 1-process run."""

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import save_tiny_clip
from tests.training.test_ddp import run_cli
from tests.training.test_finetune_cli import fit_args

pytestmark = pytest.mark.ddp

PROMPTS = ["a red circle", "a blue square", "two green stars", "a yellow triangle", "a cyan circle"]


def eval_yaml(path: Path, out: Path, prompts: Path, reference: Path, clip: str) -> str:
    shared = {"prompts": [{"path": str(prompts)}], "sampling": {"num_inference_steps": 2, "guidance_scale": 3.0}, "batch_size": 2}
    callbacks = [
        {"class_path": "tests.helpers.RecordEvaluation",
         "init_args": {"out_dir": str(out / "eval"), "log_samples": 3, **shared}},
        {"class_path": "t2i_align.callbacks.fid.FIDEvaluation",
         "init_args": {"reference_dir": str(reference), "feature": {"class_path": "tests.helpers.ColourStats"},
                       "reference_resolution": 32, "cache_dir": str(out.parent / "fid_cache"), "log_samples": 0,
                       **shared}},
        {"class_path": "t2i_align.callbacks.clip_score.CLIPScoreEvaluation",
         "init_args": {"pretrained": clip, "backbone": "tiny", "log_samples": 0, **shared}},
        {"class_path": "tests.helpers.DumpMetrics", "init_args": {"out_dir": str(out / "metrics")}},
    ]
    path.write_text(yaml.safe_dump({"trainer": {"logger": False, "enable_progress_bar": False, "callbacks": callbacks}}))
    return str(path)


def test_evaluation_under_ddp(tiny_sd, tiny_pairs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in PROMPTS))
    clip = save_tiny_clip(tmp_path / "clip")
    reference = Path(tiny_pairs).parent / "images"
    runs = {}
    for name, extra in {"ddp": ["--trainer.strategy=ddp", "--trainer.devices=2"],
                        "single": ["--data.init_args.batch_size=4"]}.items():
        out = tmp_path / name
        out.mkdir()
        cfg = eval_yaml(tmp_path / f"{name}.yaml", out, prompts, reference, clip)
        run_cli(fit_args(tiny_sd, tiny_pairs, out, max_steps=2, extra=[
            "--config", cfg, "--trainer.val_check_interval=1", "--data.init_args.val_pairs.limit=2", *extra]))
        runs[name] = out

    ddp = runs["ddp"]
    passes = [json.loads((ddp / "eval" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(passes[0]) == len(passes[1]) == 2  # one evaluation per validation
    for a, b in zip(*passes):
        assert len(a) == 3 and len(b) == 2  # 5 prompts split 3 / 2
        assert sorted(a + b) == sorted(f"prompts/{i}/0" for i in range(5))  # each exactly once

    rows = [json.loads((ddp / "metrics" / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((runs["single"] / "metrics" / "rank0.json").read_text())
    for row in rows[0]:  # each pass's cost is logged beside its metrics (wall times differ between ranks)
        assert {k for k in row if k.endswith("/seconds")} == {
            "val/record/seconds", "val/fid5_colourstats6/seconds", "val/clip_tiny_x100/seconds"}
        assert all(row[k] > 0 for k in row if k.endswith("/seconds"))
    rows = [[{k: v for k, v in row.items() if not k.endswith("/seconds")} for row in rank] for rank in rows]
    assert rows[0] == rows[1]  # the same numbers on both ranks
    for got, want in zip(rows[0], single):
        assert got["val/record/images"] == 5.0
        assert {"val/fid5_colourstats6", "val/clip_tiny_x100"} <= set(got)
        assert got["val/fid5_colourstats6"] == pytest.approx(want["val/fid5_colourstats6"], rel=1e-3)
        # DDP and 1-process weights agree to ~1e-6, which can flip a few uint8 pixels before CLIP: allow a
        # cosine change of 2e-4 (the exactly-once split is checked above from the recorded keys)
        assert got["val/clip_tiny_x100"] == pytest.approx(want["val/clip_tiny_x100"], abs=0.02)
    assert (ddp / "samples" / "record" / "step_1.png").exists()
    assert len(list((tmp_path / "fid_cache").glob("fid_ref_*.pt"))) == 1  # computed once, reused
