"""The benchmark scripts run on CPU with the tiny model (smoke check: numbers come out and are consistent)."""

import importlib.util
import json
from pathlib import Path

from tests.helpers import REPO_ROOT


def load_script(name: str):
    path = Path(REPO_ROOT) / "experiments" / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refl_step_benchmark_smoke(tmp_path):
    out = tmp_path / "refl.json"
    load_script("refl_step").main(["--steps", "2", "--num-inference-steps", "4", "--min-step", "1", "--max-step", "3",
                                   "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["size"] == "tiny" and result["batch"] == 2 and len(result["sec_per_step_all"]) == 2
    assert result["sec_per_step"] > 0 and result["tflop_per_step"] > 0
    assert abs(result["fraction_of_peak"] - result["achieved_tflops"] / result["peak_tflops_measured"]) < 1e-9


def test_comat_step_benchmark_smoke(tmp_path):
    out = tmp_path / "comat.json"
    load_script("comat_step").main(["--steps", "1", "--warmup", "1", "--num-inference-steps", "4", "--num-grad-steps",
                                    "2", "--grad-stride", "2", "--segmenter", "half", "--out", str(out)])
    result = json.loads(out.read_text())
    keys = {"size", "device", "batch", "resolution", "dtype", "lora_rank", "discriminator_lora_rank",
            "gradient_checkpointing", "num_inference_steps", "num_grad_steps", "sec_per_iteration",
            "sec_per_iteration_all", "peak_memory_gib", "tflop_per_iteration", "achieved_tflops",
            "peak_tflops_measured", "fraction_of_peak", "nonfinite_iterations", "target"}
    assert keys <= set(result)
    assert result["size"] == "tiny" and result["batch"] == 2 and result["num_grad_steps"] == 2
    assert len(result["sec_per_iteration_all"]) == 1 and result["nonfinite_iterations"] == 0
    assert result["sec_per_iteration"] > 0 and result["tflop_per_iteration"] > 0
    assert abs(result["achieved_tflops"] - result["tflop_per_iteration"] / result["sec_per_iteration"]) < 1e-9
    assert abs(result["fraction_of_peak"] - result["achieved_tflops"] / result["peak_tflops_measured"]) < 1e-9
    assert result["peak_memory_gib"] is None and result["target"]["met"] is None  # CPU: the target does not apply


def test_speed_benchmark_result_comparisons(tmp_path):
    """speed.py's equality checks: identical verdicts are counted per image, latents and weights compared exactly."""
    import torch

    speed = load_script("speed")
    before, after = tmp_path / "before", tmp_path / "after"
    records = [{"key": f"c/{i}/0", "scores": {"all_clauses": float(i % 2)}, "clauses": [[f"clause {i}", True]]}
               for i in range(4)]
    changed = [dict(r) for r in records]
    changed[2] = {**changed[2], "clauses": [["clause 2", False]]}
    latents = torch.randn(4, 8, 2, 2)
    for folder, recs, lat in ((before, records, latents), (after, changed, latents + 1e-6 * (torch.arange(4.0) == 3).view(4, 1, 1, 1))):
        folder.mkdir()
        (folder / "per_image.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        torch.save(lat, folder / "latents.pt")
    c = speed.compare_eval(before, after)
    assert c["images"] == 4 and c["identical_verdicts"] == 3 and not c["latents_bit_identical"]
    assert 0 < c["latents_max_abs_diff"] < 1e-5
    torch.save({"w": torch.ones(3)}, before / "weights.pt")
    torch.save({"w": torch.ones(3) * 1.5, "extra": torch.zeros(1)}, after / "weights.pt")
    t = speed.compare_train(before, after, {"logged": [("train/loss", 2.0)]}, {"logged": [("train/loss", 2.2)]})
    assert t["same_names"] and abs(t["loss_max_rel_diff"] - 0.1) < 1e-9
    assert t["weights_compared"] == 1 and t["weights_missing"] == 1 and t["weights_max_abs_diff"] == 0.5
    assert any("train_prompts" in arg for arg in speed.data_overrides(tmp_path, "comat"))


def test_gpu_check_smoke_mode_runs_every_check(tmp_path):
    """The prepared GPU check runs on CPU with tiny models (so it cannot rot between GPU sessions): every check ends
    ok, or skipped where it needs CUDA, and the report is written as JSON and Markdown."""
    import subprocess
    import sys

    script = Path(REPO_ROOT) / "experiments" / "benchmarks" / "gpu_check.py"
    run = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    gpu = load_script("gpu_check")
    assert list(report["checks"]) == list(gpu.CHECKS)
    status = {name: row["status"] for name, row in report["checks"].items()}
    assert status == {**{n: "ok" for n in gpu.CHECKS}, "gpu_tests": "skipped", "sync_audit": "skipped"}, report
    assert report["checks"]["tokencompose_step"]["result"]["sec_per_update"] > 0
    assert "weights_path" in report["checks"]["fid_offline"]["result"]["message"]
    assert (tmp_path / "gpu_check.md").read_text().count("| ok |") == len(gpu.CHECKS) - 2


# ------------------------------------------------------------------------------------------------ SDXL size (issue 28)
def test_sdxl_size_defaults():
    """--size sdxl takes CoMat-SDXL's settings (paper Table 8: batch 6, LoRA rank 128, lambda 0.5) at 1024 px and
    ReFL's at batch 4, 1024 px, with gradient checkpointing; sd15's defaults are unchanged; options still win."""
    comat, refl = load_script("comat_step"), load_script("refl_step")
    xl = comat.parse_args(["--size", "sdxl"])
    assert (xl.batch, xl.resolution, xl.lora_rank, xl.adversarial_weight) == (6, 1024, 128, 0.5)
    assert (xl.num_inference_steps, xl.num_grad_steps, xl.grad_stride, xl.gradient_checkpointing) == (50, 5, 10, True)
    sd = comat.parse_args(["--size", "sd15"])
    assert (sd.batch, sd.resolution, sd.lora_rank, sd.adversarial_weight, sd.gradient_checkpointing) == (
        4, 512, 128, 1.0, False)
    own = comat.parse_args(["--size", "sdxl", "--resolution", "512", "--no-gradient-checkpointing", "--batch", "2"])
    assert (own.resolution, own.gradient_checkpointing, own.batch) == (512, False, 2)
    r = refl.parse_args(["--size", "sdxl"])
    assert (r.batch, r.resolution, r.lora_rank, r.gradient_checkpointing) == (4, 1024, 0, True)
    r = refl.parse_args(["--size", "sd15"])
    assert (r.batch, r.resolution, r.gradient_checkpointing) == (4, 512, False)
    assert refl.parse_args(["--size", "tiny-sdxl"]).resolution == 32


def test_pipeline_folder_builds_each_size_and_refuses_another_sizes_folder(tmp_path, monkeypatch):
    import pytest

    from t2i_align.diffusion import tiny

    timing = load_script("_timing")
    folder = timing.pipeline_folder(None, tmp_path, "tiny-sdxl")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert timing.pipeline_folder(str(folder), tmp_path / "other", "tiny-sdxl") == folder  # reused, not rebuilt
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    for other in ("tiny", "sdxl", "sd15"):  # an SD pipeline, or SDXL of another size, would time the wrong model
        with pytest.raises(ValueError, match="tiny-sdxl|not the"):
            timing.pipeline_folder(str(folder), tmp_path, other)
    built = []
    monkeypatch.setattr(tiny, "save_random_sdxl", lambda path: built.append(("sdxl", path)) or path)
    monkeypatch.setattr(tiny, "save_random_sd15", lambda path: built.append(("sd15", path)) or path)
    timing.pipeline_folder(None, tmp_path / "a", "sdxl")
    timing.pipeline_folder(None, tmp_path / "b", "sd15")
    assert built == [("sdxl", tmp_path / "a" / "sd"), ("sd15", tmp_path / "b" / "sd")]


def test_refl_step_benchmark_smoke_tiny_sdxl(tmp_path):
    out, model = tmp_path / "refl.json", tmp_path / "model"
    load_script("refl_step").main(["--size", "tiny-sdxl", "--steps", "1", "--num-inference-steps", "3", "--min-step",
                                   "1", "--max-step", "2", "--model-dir", str(model), "--out", str(out)])
    result = json.loads(out.read_text())
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert result["size"] == "tiny-sdxl" and result["sdxl"] and result["gradient_checkpointing"]
    assert result["batch"] == 2 and result["resolution"] == 32 and len(result["sec_per_step_all"]) == 1
    assert result["sec_per_step"] > 0 and result["tflop_per_step"] > 0 and result["peak_memory_gib"] is None


def test_comat_step_benchmark_smoke_tiny_sdxl(tmp_path):
    out, model = tmp_path / "comat.json", tmp_path / "model"
    load_script("comat_step").main(["--size", "tiny-sdxl", "--steps", "1", "--warmup", "1", "--num-inference-steps",
                                    "4", "--num-grad-steps", "2", "--grad-stride", "2", "--model-dir", str(model),
                                    "--out", str(out)])
    result = json.loads(out.read_text())
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert result["size"] == "tiny-sdxl" and result["sdxl"] and result["adversarial_weight"] == 0.5
    assert result["batch"] == 2 and len(result["sec_per_iteration_all"]) == 1 and result["nonfinite_iterations"] == 0
    assert result["sec_per_iteration"] > 0 and result["tflop_per_iteration"] > 0
    assert result["target"]["met"] is None  # the target is SD1.5's


def test_gpu_check_sdxl_passes_the_size_to_each_step_and_its_child(tmp_path, monkeypatch):
    """At GPU size --model sdxl sends the step benchmarks --size sdxl with no override of their SDXL defaults (CoMat
    batch 6, 1024 px), and each check's child process gets --model sdxl and the SDXL time limit."""
    import argparse
    import types

    gpu = load_script("gpu_check")
    comat, refl = load_script("comat_step"), load_script("refl_step")
    calls = {}

    def fake(name):
        def main(args):
            calls[name] = args
            keys = ("size", "batch", "resolution", "dtype", "num_inference_steps", "num_grad_steps", "lora_rank",
                    "gradient_checkpointing", "sec_per_iteration", "sec_per_step", "peak_memory_gib",
                    "fraction_of_peak", "nonfinite_iterations", "target")
            Path(args[args.index("--out") + 1]).write_text(json.dumps({k: 0 for k in keys}))
        return types.SimpleNamespace(main=main)

    monkeypatch.setattr(gpu, "script", fake)
    a = argparse.Namespace(smoke=False, model="sdxl", model_dir=str(tmp_path / "m"))
    gpu.check_comat_step(a)
    gpu.check_refl_step(a)
    c, r = comat.parse_args(calls["comat_step"]), refl.parse_args(calls["refl_step"])
    assert (c.size, c.batch, c.resolution, c.gradient_checkpointing) == ("sdxl", 6, 1024, True)
    assert (r.size, r.batch, r.resolution, r.gradient_checkpointing) == ("sdxl", 4, 1024, True)
    a.smoke = True
    gpu.check_comat_step(a)
    assert comat.parse_args(calls["comat_step"]).size == "tiny-sdxl"

    seen = {}

    def run(cmd, **kwargs):
        seen.update(cmd=cmd, timeout=kwargs["timeout"])
        return types.SimpleNamespace(returncode=1, stdout="", stderr="")

    monkeypatch.setattr(gpu.subprocess, "run", run)
    a.smoke = False
    assert gpu.run_isolated("comat_step", a)["status"] == "failed"  # the fake child wrote no row
    assert seen["cmd"][seen["cmd"].index("--model") + 1] == "sdxl"
    assert seen["timeout"] == gpu.LIMITS_S_SDXL["comat_step"] > gpu.LIMITS_S["comat_step"]


def test_gpu_check_smoke_mode_sdxl(tmp_path):
    """--smoke --model sdxl: the model-bound checks run on the tiny SDXL pipeline and end ok."""
    import subprocess
    import sys

    script = Path(REPO_ROOT) / "experiments" / "benchmarks" / "gpu_check.py"
    checks = ["refl_step", "tokencompose_step", "fine_stage"]
    run = subprocess.run([sys.executable, str(script), "--smoke", "--model", "sdxl", "--out", str(tmp_path),
                          "--checks", *checks], check=False, cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["model"] == "sdxl" and report["size"] == "tiny-sdxl"
    assert {n: row["status"] for n, row in report["checks"].items()} == {n: "ok" for n in checks}, report
    assert all(row["result"]["size"] == "tiny-sdxl" for row in report["checks"].values())
    index = Path(report["model_dir"]["path"]) / "model_index.json"
    assert json.loads(index.read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert report["checks"]["tokencompose_step"]["result"]["gradient_checkpointing"] is True
