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
