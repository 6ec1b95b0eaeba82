"""`t2i-align predict` renders a prompt file into a benchmark layout and resumes by skipping finished files."""

import json
from pathlib import Path

import pytest
from PIL import Image

from t2i_align.cli import main as cli_main
from t2i_align.datamodules.export import get_layout as layout
from t2i_align.datamodules.prompts import read_prompts
from tests.helpers import REPO_ROOT

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
        "--data.init_args.num_inference_steps=2",
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
        "sampling": (prompts, ["--data.init_args.guidance_scale=3.0"]),
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
