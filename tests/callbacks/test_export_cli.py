"""`t2i-align predict` renders a prompt file into a benchmark layout and resumes by skipping finished files."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from t2i_align.cli import main as cli_main
from t2i_align.datamodules.export import get_layout as layout
from t2i_align.datamodules.prompts import read_prompts
from t2i_align.io import CheckpointError
from t2i_align.runs import CONFIG_KEY
from tests.helpers import REPO_ROOT
from tests.test_runs import fit_args

CONFIGS = Path(REPO_ROOT) / "configs"


def predict(tiny_sd, prompts: Path, name: str, out: Path, extra=()) -> None:
    cli_main([
        "predict",
        "--config", str(CONFIGS / "trainer/cpu.yaml"),
        "--config", str(CONFIGS / "method/finetune.yaml"),
        "--config", str(CONFIGS / "model/tiny.yaml"),
        f"--model.init_args.generator.pretrained={tiny_sd}",
        "--data.class_path=t2i_align.datamodules.BenchmarkExportData",
        f"--data.init_args.prompts.path={prompts}",
        f"--data.init_args.layout={name}",
        f"--data.init_args.output_dir={out}",
        "--data.init_args.sampling.num_inference_steps=2",
        "--data.init_args.batch_size=3",
        "--trainer.callbacks+=t2i_align.callbacks.benchmark_export.BenchmarkWriter",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={out.parent}",
        "--return_predictions=false",
        *extra,
    ])


def test_compbench_and_dpg_exports_resume(tiny_sd, tmp_path):
    prompts = tmp_path / "color_val.txt"
    prompts.write_text("a green bench and a blue bowl\na red car\na red car\n")
    out = tmp_path / "compbench"
    predict(tiny_sd, prompts, "t2i_compbench", out, ["--data.init_args.images_per_prompt=2"])
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == sorted(["a green bench and a blue bowl_000000.png", "a green bench and a blue bowl_000001.png",
                            "a red car_000002.png", "a red car_000003.png", "a red car_000004.png",
                            "a red car_000005.png"])
    info = json.loads((out / "export.json").read_text())
    assert info["files_written"] == 6 and info["files_skipped_as_existing"] == 0 and info["complete"]
    assert info["recipe"]["sampling"]["num_inference_steps"] == 2 and info["recipe"]["prompts"]["count"] == 3
    assert info["recipe"]["checkpoint"] == "base weights"  # no --ckpt_path: the pretrained model as loaded
    first = {n: (out / "samples" / n).stat().st_mtime_ns for n in names}
    (out / "samples" / names[0]).unlink()  # as if interrupted before this file
    predict(tiny_sd, prompts, "t2i_compbench", out, ["--data.init_args.images_per_prompt=2"])
    info = json.loads((out / "export.json").read_text())
    assert info["files_written"] == 1 and info["files_skipped_as_existing"] == 5 and info["complete"]
    assert all((out / "samples" / n).stat().st_mtime_ns == t for n, t in first.items() if n != names[0])

    dpg = tmp_path / "dpg"
    folder = tmp_path / "dpg_prompts"
    folder.mkdir()
    (folder / "7.txt").write_text("a cat on a mat\n")
    predict(tiny_sd, folder, "dpg_bench", dpg)
    grid = Image.open(dpg / "7.png")
    assert grid.size == (64, 64)  # 2 x 2 tiny images of 32 px, no gaps
    assert layout("dpg_bench").parse("7.png") == (read_prompts(folder)[0].id, 0)


def test_an_export_folder_is_reused_only_for_the_same_recipe(tiny_sd, tmp_path):
    """Other prompts, other sampler settings or other weights into the same folder are refused before a
    file is written; so are image files without a record of how they were made."""
    prompts = tmp_path / "color_val.txt"
    prompts.write_text("a red car\na blue bowl\n")
    out = tmp_path / "export"
    predict(tiny_sd, prompts, "t2i_compbench", out, ["--data.init_args.images_per_prompt=1"])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    record = (out / "export.json").read_text()

    other_prompts = tmp_path / "other.txt"
    other_prompts.write_text("a red car\na green bench\n")
    changes = {
        "prompts": (other_prompts, []),
        "sampling": (prompts, ["--data.init_args.sampling.guidance_scale=3.0"]),
        "weights": (prompts, ["--model.init_args.generator.lora.init=gaussian"]),  # other (random) LoRA weights
    }
    for what, (prompt_file, extra) in changes.items():
        with pytest.raises(RuntimeError, match=rf"{out} holds an export of other settings: .*{what}"):
            predict(tiny_sd, prompt_file, "t2i_compbench", out, ["--data.init_args.images_per_prompt=1", *extra])
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before, what  # nothing written
        assert (out / "export.json").read_text() == record

    (out / "export.json").unlink()
    with pytest.raises(RuntimeError, match=r"already holds 2 of this export's image files but no export\.json"):
        predict(tiny_sd, prompts, "t2i_compbench", out, ["--data.init_args.images_per_prompt=1"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_predict_last_refuses_runs_that_differ_in_data_only_and_export_json_names_the_checkpoint(
        tiny_sd, tiny_pairs, tmp_path):
    """A data ablation in the same logger folder is not exported by surprise: `last` names both candidates, and
    the export records the checkpoint it used (path, digest of the file, the run config recorded in it)."""
    runs = tmp_path / "runs"
    cli_main(fit_args(tiny_sd, tiny_pairs, runs, max_steps=1))  # version_0
    cli_main(fit_args(tiny_sd, tiny_pairs, runs, max_steps=1, extra=["--data.init_args.seed=1"]))  # the ablation
    first, ablation = (runs / "t2i-align" / f"version_{i}" / "checkpoints" / "last.ckpt" for i in (0, 1))
    prompts = tmp_path / "color_val.txt"
    prompts.write_text("a red car\n")
    out = tmp_path / "export"
    args = ["--data.init_args.images_per_prompt=1", "--config", str(CONFIGS / "logger/csv.yaml"),
            f"--trainer.logger.init_args.save_dir={runs}"]
    with pytest.raises(CheckpointError) as info:
        predict(tiny_sd, prompts, "t2i_compbench", out, [*args, "--ckpt_path=last"])
    message = str(info.value)
    assert "\n" not in message and str(first) in message and str(ablation) in message
    assert "data.init_args.seed" in message and "--ckpt_path" in message
    assert not out.exists()

    predict(tiny_sd, prompts, "t2i_compbench", out, [*args, f"--ckpt_path={first}"])
    recorded = json.loads((out / "export.json").read_text())["recipe"]["checkpoint"]
    trained = torch.load(first, weights_only=True)[CONFIG_KEY]
    assert recorded == {"path": str(first), "sha256": sha256(first), "config": trained}
    assert trained["data"]["init_args"]["seed"] == 0


def test_an_export_resumes_only_with_the_checkpoint_it_was_started_with(tiny_sd, tiny_pairs, tmp_path):
    cli_main(fit_args(tiny_sd, tiny_pairs, tmp_path, max_steps=1, logger=None))  # the one run in tmp_path/checkpoints
    prompts = tmp_path / "color_val.txt"
    prompts.write_text("a red car\n")
    out = tmp_path / "export"
    two = ["--data.init_args.images_per_prompt=2"]
    predict(tiny_sd, prompts, "t2i_compbench", out, [*two, "--ckpt_path=last"])  # one run: `last` is no guess
    ckpt = Path(json.loads((out / "export.json").read_text())["recipe"]["checkpoint"]["path"])
    assert ckpt.parent == tmp_path / "checkpoints"
    (out / "samples" / "a red car_000000.png").unlink()  # as if interrupted before this file
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    # the same trained weights, but another checkpoint (of another run record): not mixed into the folder
    other = torch.load(ckpt, weights_only=True)
    other[CONFIG_KEY]["data"]["init_args"]["seed"] = 1
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(RuntimeError, match=rf"{out} holds an export of other settings: .*checkpoint") as info:
        predict(tiny_sd, prompts, "t2i_compbench", out, [*two, f"--ckpt_path={tmp_path / 'other.ckpt'}"])
    assert str(ckpt) in str(info.value) and str(tmp_path / "other.ckpt") in str(info.value)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written

    # the same file moved elsewhere resumes the export
    moved = tmp_path / "moved.ckpt"
    shutil.copy(ckpt, moved)
    predict(tiny_sd, prompts, "t2i_compbench", out, [*two, f"--ckpt_path={moved}"])
    info = json.loads((out / "export.json").read_text())
    assert info["complete"] and info["files_written"] == 1 and info["files_skipped_as_existing"] == 1
    assert info["recipe"]["checkpoint"]["path"] == str(moved) and info["recipe"]["checkpoint"]["sha256"] == sha256(ckpt)


def test_a_prompt_too_long_for_a_file_name_is_refused_before_anything_is_rendered(tiny_sd, tmp_path):
    from t2i_align.common import ConfigError

    prompts = tmp_path / "color_val.txt"
    long_prompt = "a red car next to " + "a very long green bench " * 10  # ~260 bytes: fine for CLIP, not for ext4
    prompts.write_text(f"a blue bowl\n{long_prompt.strip()}\n")
    out = tmp_path / "compbench"
    with pytest.raises(ConfigError, match=r"prompt color_val:1 gives the file name 'a red car next to a very long [^']*\.\.\.' "
                                          r"\(\d+ bytes\), longer than file systems take"):
        predict(tiny_sd, prompts, "t2i_compbench", out)
    assert not out.exists() or not any(out.rglob("*.png"))  # refused up front, not midway
