"""The prepared GPU check: what only a GPU can tell, in one command and one report.

    python experiments/benchmarks/gpu_check.py --out runs/gpu_check          # one CUDA GPU: SD1.5 size (planned: 8 min)
    # the random SD1.5 pipeline (~4 GB) is written once, into --model-dir (default: under --out)
    python experiments/benchmarks/gpu_check.py --smoke --out /tmp/gpu_check  # CPU, tiny models (CI runs this)
    python experiments/benchmarks/gpu_check.py --model sdxl --out runs/gpu_check_sdxl --checks comat_step refl_step \
        tokencompose_step fine_stage                                          # one CUDA GPU: SDXL size, 1024 px
    # the random SDXL pipeline (~7 GB in float16, minutes to build on the CPU) is written once, into --model-dir

Random weights at SD1.5 size (the same cost as the real ones; nothing is downloaded). Each check runs in its own
process with a time limit, so an out-of-memory error, a CUDA fault or a hang is recorded and the next check runs;
the report is ``gpu_check.json`` + ``gpu_check.md`` in ``--out``. The checks:

* ``versions``: torch, CUDA, cuDNN, the GPU, and the libraries that decide numerics and kernels.
* ``comat_step``, ``refl_step``: one training iteration each (``comat_step.py``, ``refl_step.py``: seconds per
  iteration and peak memory; CoMat's target: <= 1.5 s at <= 30 GiB, SD1.5, batch 4, 50 DDPM steps, CFG 7.5, K = 5,
  the discriminator step and a BLIP-large-size captioner).
* ``tokencompose_step``: one TokenCompose update of the whole UNet (the paper's setting: batch 1, 512 px, fp32
  weights) under ``bf16-mixed``: seconds and peak memory.
* ``fine_stage``: the fine stage's two passes at 512 px, batch 8 (64x64 self-attention edits): seconds per image
  and peak memory.
* ``gpu_tests``: ``pytest -m gpu``: the tests that need CUDA (expert placement, a requeue checkpoint written inside
  CoMat's optimizer toggles, the LoRA export round trip, bf16-mixed vs 16-mixed updates).
* ``fid_offline``: the FID callback on a node without internet and without Inception weights: a clear error naming
  the option, not a download attempt or a hang.
* ``sync_audit``: ``torch.cuda.set_sync_debug_mode("warn")`` over sampling and a ReFL step: each place in
  t2i_align that makes the host wait for the GPU, with its count.

In ``--smoke`` mode the same checks run on CPU with tiny models; those that need CUDA say "skipped".

``--model sdxl`` (default ``sd15``) runs the checks at SDXL base's size instead (random weights of
``save_random_sdxl``, 1024 px; in ``--smoke`` mode the tiny SDXL pipeline): ``comat_step`` at CoMat-SDXL's batch 6
(the paper's Table 8), ``refl_step`` at batch 4, ``tokencompose_step`` at batch 1, ``fine_stage`` at batch 8, all at
1024 px; gradient checkpointing on where there is a backward pass (as configs/model/sdxl.yaml). ``sync_audit`` then
audits the SDXL pipeline; ``versions``, ``gpu_tests`` and ``fid_offline`` do not depend on the model. None of the
SDXL-size checks has run on a GPU yet: their time limits (``LIMITS_S_SDXL``) are estimates, not measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHECKS = ("versions", "comat_step", "refl_step", "tokencompose_step", "fine_stage", "gpu_tests", "fid_offline",
          "sync_audit")
LIMITS_S = {"versions": 60, "comat_step": 240, "refl_step": 150, "tokencompose_step": 150, "fine_stage": 150,
            "gpu_tests": 240, "fid_offline": 60, "sync_audit": 120}  # per check, on the GPU; x3 in smoke mode
# --model sdxl: UNMEASURED (no SDXL-size check has run on a GPU yet). SDXL's UNet costs ~3x SD1.5's per step at the same
# latent size and 1024 px has 4x SD1.5's latent pixels (attention more), the pipeline to load is ~7 GB, and CoMat runs
# batch 6 instead of 4: the model-bound checks get larger limits. Replace these with measured times + margin.
LIMITS_S_SDXL = {**LIMITS_S, "comat_step": 600, "refl_step": 450, "tokencompose_step": 300, "fine_stage": 450,
                 "sync_audit": 300}
MODELS = ("sd15", "sdxl")


class Skip(Exception):
    """A check that does not apply here (e.g. needs CUDA)."""


def script(name: str):
    """A sibling benchmark script as a module (this folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    spec.loader.exec_module(module)
    return module


def cuda_device(a):
    import torch

    return torch.device("cuda" if not a.smoke else "cpu")


def size(a) -> str:
    """The benchmark size (``_timing.SIZES``) of this run: ``--model`` at full size, or its tiny one in smoke mode."""
    return {("sd15", False): "sd15", ("sd15", True): "tiny", ("sdxl", False): "sdxl", ("sdxl", True): "tiny-sdxl"}[
        (a.model, a.smoke)]


def xl(a) -> bool:
    return a.model == "sdxl"


def need_cuda(a) -> None:
    import torch

    if a.smoke or not torch.cuda.is_available():
        raise Skip("needs CUDA")


# ---------------------------------------------------------------------------------------------- checks
def check_versions(a) -> dict:
    import diffusers
    import lightning
    import peft
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "lightning": lightning.__version__, "peft": peft.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count())
    return out


def check_comat_step(a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "comat.json"
        args = ["--device", str(cuda_device(a)), "--out", str(out), "--model-dir", a.model_dir, "--size", size(a)]
        # the size's defaults: SD1.5 batch 4 at 512 px; SDXL batch 6 (Table 8) at 1024 px, gradient checkpointing
        args += (["--steps", "1", "--warmup", "1", "--num-inference-steps", "4", "--num-grad-steps", "2",
                  "--grad-stride", "2"] if a.smoke else ["--steps", "3", "--warmup", "1"])
        script("comat_step").main(args)
        r = json.loads(out.read_text())
    return {k: r[k] for k in ("size", "batch", "resolution", "dtype", "num_inference_steps", "num_grad_steps",
                              "gradient_checkpointing", "sec_per_iteration", "peak_memory_gib", "fraction_of_peak",
                              "nonfinite_iterations", "target")}


def check_refl_step(a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "refl.json"
        args = ["--device", str(cuda_device(a)), "--out", str(out), "--model-dir", a.model_dir, "--size", size(a)]
        args += (["--steps", "1", "--num-inference-steps", "4", "--min-step", "1", "--max-step", "3"] if a.smoke
                 else ["--steps", "3"])  # the size's defaults: batch 4; 512 px SD1.5, 1024 px SDXL
        script("refl_step").main(args)
        r = json.loads(out.read_text())
    return {k: r[k] for k in ("size", "batch", "resolution", "dtype", "lora_rank", "gradient_checkpointing",
                              "sec_per_step", "peak_memory_gib", "fraction_of_peak")}


def build_pipeline(a, folder: Path) -> str:
    """The random pipeline of this run's size the parent built once (``--model-dir``); ``folder`` if none was given."""
    return str(script("_timing").pipeline_folder(a.model_dir, folder.parent, size(a)))


def check_tokencompose_step(a) -> dict:
    import lightning as L

    from t2i_align.datamodules import T2IDataModule
    from t2i_align.datamodules.pairs import PairSource
    from t2i_align.datamodules.synthetic import write_shape_pairs
    from t2i_align.diffusion.generator import GeneratorConfig
    from t2i_align.lightning_modules.tokencompose import TokenCompose

    device = cuda_device(a)
    resolution, warmup, steps = (32, 1, 1) if a.smoke else (1024 if xl(a) else 512, 2, 4)
    timer = script("comat_step").IterationTimer(device, warmup, steps)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs = write_shape_pairs(tmp / "pairs", count=8, size=resolution)
        # SDXL: the whole 2.6 B UNet in float32 with AdamW is ~42 GB before activations: gradient checkpointing on
        module = TokenCompose(generator=GeneratorConfig(pretrained=build_pipeline(a, tmp / "sd"), lora=None,
                                                        weight_dtype="float32", gradient_checkpointing=xl(a)))
        data = T2IDataModule(train_pairs=PairSource(str(pairs)), batch_size=1, resolution=resolution)
        trainer = L.Trainer(max_steps=warmup + steps + 1, accelerator=device.type, devices=1,
                            precision="bf16-mixed", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=[timer], default_root_dir=tmp)
        trainer.fit(module, datamodule=data)
    return {"size": size(a), "resolution": resolution, "batch": 1, "weights": "float32, whole UNet",
            "precision": "bf16-mixed", "gradient_checkpointing": module.generator.config.gradient_checkpointing,
            "sec_per_update": sorted(timer.times)[len(timer.times) // 2],
            "peak_memory_gib": None if timer.peak_bytes is None else timer.peak_bytes / 2**30}


class LeftHalf:
    """Stand-in experts for timing the fine stage: every image holds its prompt's first noun in the left half."""

    def tags(self, images):
        return [["circle"] for _ in images]

    def __call__(self, prompt, tags):
        return ["may" for _ in tags]

    def describe(self, prompt, tags):
        return ["red circle" for _ in tags]

    def masks(self, images, phrases):
        import torch

        out = []
        for texts in phrases:
            m = torch.zeros(len(texts), *images.shape[-2:], dtype=torch.bool)
            m[:, :, : images.shape[-1] // 2] = True
            out.append(m)
        return out


def check_fine_stage(a) -> dict:
    import torch

    from t2i_align.diffusion.generator import GeneratorConfig
    from t2i_align.diffusion.sampling import SamplingSettings
    from t2i_align.lightning_modules.fine_stage import FineStage

    device = cuda_device(a)
    batch, resolution, steps = (2, 32, 4) if a.smoke else (8, 1024 if xl(a) else 512, 25)
    experts = LeftHalf()
    with tempfile.TemporaryDirectory() as tmp:
        dtype = "float32" if a.smoke else "bfloat16"
        module = FineStage(generator=GeneratorConfig(pretrained=build_pipeline(a, Path(tmp) / "sd"), weight_dtype=dtype),
                           tagger=experts, judge=experts, segmenter=experts).to(device)
    module.experts.to(device)
    sampling = SamplingSettings(num_inference_steps=steps, guidance_scale=7.5, resolution=resolution)
    prompts = ["a red circle to the left of a blue square"] * batch
    with torch.no_grad():
        module.sample(prompts, list(range(batch)), sampling)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        module.sample(prompts, list(range(batch, 2 * batch)), sampling)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"size": size(a), "batch": batch, "resolution": resolution, "num_inference_steps": steps, "weights": dtype,
            "sec_per_image": seconds / batch, "peak_memory_gib": peak}


def check_gpu_tests(a) -> dict:
    need_cuda(a)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        run = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                              f"--junitxml={report}"], cwd=REPO, capture_output=True, text=True)
        import xml.etree.ElementTree as ET

        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        failed = [f"{case.get('classname')}.{case.get('name')}" for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
    out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["failed"] = failed
    if run.returncode not in (0, 5) or failed:  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu: {out}\n{run.stdout[-3000:]}")
    return out


def check_fid_offline(a) -> dict:
    """Without local Inception weights the FID callback must refuse at construction in one sentence that names its
    option, on every rank, instead of downloading (compute nodes have no network)."""
    from t2i_align.callbacks.fid import FIDEvaluation

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCH_HOME"] = tmp  # an empty hub cache: as on a fresh compute node
        tic = time.perf_counter()
        try:
            FIDEvaluation(reference_dir=tmp, prompts=[{"path": str(Path(tmp) / "prompts.txt")}],
                          cache_dir=str(Path(tmp) / "cache"))
        except Exception as e:  # noqa: BLE001 - the refusal is what this check wants to see
            message = f"{type(e).__name__}: {e}"
        else:
            raise RuntimeError("the FID callback was built without Inception weights and without network")
    if "weights_path" not in message or len(message) > 2000:
        raise RuntimeError(f"unclear refusal: {message[:2000]}")
    return {"refused_in_s": round(time.perf_counter() - tic, 3), "message": message[:500]}


def check_sync_audit(a) -> dict:
    need_cuda(a)
    import torch

    from t2i_align.diffusion.generator import GeneratorConfig, LoraSettings
    from t2i_align.diffusion.sampling import SamplingSettings
    from t2i_align.lightning_modules.refl import ReFL
    from t2i_align.rewards.clip import CLIPReward

    refl_step = script("refl_step")
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_pipeline(a, Path(tmp) / "sd")
        reward = CLIPReward(refl_step.save_reward_clip(Path(tmp) / "clip", size(a)))
        module = ReFL(generator=GeneratorConfig(pretrained=folder, lora=LoraSettings(rank=4), weight_dtype="bfloat16"),
                      reward=reward, sampling=SamplingSettings(num_inference_steps=10, guidance_scale=1.0,
                                                               scheduler="ddpm"), min_step=6, max_step=9).cuda()
    module.experts.to(torch.device("cuda"))
    prompts = ["a red circle next to a blue square"] * 2
    places: Counter = Counter()

    def audit(name: str, fn) -> None:
        fn()  # warm-up outside the audit (lazy initialisation may sync once)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchroniz" in str(w.message):
                places[f"{name}: {Path(w.filename).name}:{w.lineno}"] += 1

    with torch.no_grad():
        audit("sample (10 DDIM steps, CFG)", lambda: module.sample(prompts, [0, 1], SamplingSettings(
            num_inference_steps=10, guidance_scale=7.5)))

    def refl_loss():
        loss, _, _ = module.refl_loss(prompts, torch.Generator().manual_seed(0))
        loss.backward()

    audit("ReFL loss + backward", refl_loss)
    return {"syncs": dict(places.most_common()), "total": sum(places.values())}


# ---------------------------------------------------------------------------------------------- driver
def run_one(name: str, a) -> dict:
    """One check in this process: {"status": ok|skipped|failed, "seconds", "result"|"reason"|"error"}."""
    tic = time.perf_counter()
    try:
        result = globals()[f"check_{name}"](a)
        row = {"status": "ok", "result": result}
    except Skip as s:
        row = {"status": "skipped", "reason": str(s)}
    except BaseException as e:  # noqa: BLE001 - recorded, and the next check runs
        row = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:3000], "traceback": traceback.format_exc()[-4000:]}
    row["seconds"] = round(time.perf_counter() - tic, 1)
    return row


def run_isolated(name: str, a) -> dict:
    """One check in a child process with a time limit (an OOM, a CUDA fault or a hang stays in the child)."""
    limit = (LIMITS_S_SDXL if xl(a) else LIMITS_S)[name] * (3 if a.smoke else 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", name, "--row", str(out)]
        cmd += (["--smoke"] if a.smoke else []) + ["--model", a.model, "--model-dir", a.model_dir]
        tic = time.perf_counter()
        try:
            child = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as e:
            tail = (e.stdout or b"")[-2000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-2000:]
            return {"status": "failed", "error": f"timed out after {limit} s", "output": str(tail),
                    "seconds": round(time.perf_counter() - tic, 1)}
        if out.exists():
            return json.loads(out.read_text())
        return {"status": "failed", "error": f"the check's process died (exit {child.returncode})",
                "output": (child.stdout + child.stderr)[-3000:], "seconds": round(time.perf_counter() - tic, 1)}


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['mode']}, {report['started']})", "",
             f"Device: {report['checks'].get('versions', {}).get('result', {}).get('gpu', 'cpu')}", "",
             "| Check | Status | Seconds | Result |", "|---|---|---|---|"]
    for name, row in report["checks"].items():
        detail = row.get("result") or row.get("reason") or row.get("error", "")
        text = json.dumps(detail) if not isinstance(detail, str) else detail
        lines.append(f"| {name} | {row['status']} | {row.get('seconds', '')} | {text[:400].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models: the same code paths, no CUDA")
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    p.add_argument("--checks", nargs="*", default=list(CHECKS), choices=CHECKS)
    p.add_argument("--only", choices=CHECKS, help=argparse.SUPPRESS)  # the child process of one check
    p.add_argument("--row", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, default="sd15",
                   help="the base model's size: SD1.5 (512 px) or SDXL base (1024 px); --smoke: its tiny version")
    p.add_argument("--model-dir", help="the random pipeline's folder (default: built once under --out)")
    a = p.parse_args(argv)
    if a.only:
        row = run_one(a.only, a)
        a.row.write_text(json.dumps(row, default=str))
        return row
    mode = {"tiny": "smoke (CPU, tiny)", "tiny-sdxl": "smoke (CPU, tiny SDXL)", "sd15": "GPU, SD1.5 size",
            "sdxl": "GPU, SDXL size"}[size(a)]
    report = {"mode": mode, "model": a.model, "size": size(a), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "checks": {}}
    a.out.mkdir(parents=True, exist_ok=True)
    if a.model_dir is None:  # one random pipeline for every check (SD1.5 size: ~4 GB, SDXL ~7 GB, written once)
        a.model_dir = str(a.out / f"{size(a)}_random")
        tic = time.perf_counter()
        script("_timing").pipeline_folder(a.model_dir, a.out, size(a))
        report["model_dir"] = {"path": a.model_dir, "seconds": round(time.perf_counter() - tic, 1)}
    for name in a.checks:
        row = run_isolated(name, a)
        report["checks"][name] = row
        print(f"{name}: {row['status']} ({row.get('seconds')} s) {row.get('error', '')[:300]}", flush=True)
        # written after every check: a session that runs out of time still has the finished ones
        (a.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (a.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
