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
