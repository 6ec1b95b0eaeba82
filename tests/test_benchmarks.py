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
