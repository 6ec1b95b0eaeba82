"""Before/after speed of the ToyWorld study workloads, each tree running its own code and configs, and the check that
the faster code gives the same results.

    python experiments/benchmarks/speed.py --baseline db58a24            # ~15 min on a 2-core CPU
    python experiments/benchmarks/speed.py --baseline db58a24 --per-category 100 --images-per-prompt 3 --repeats 1
                                                                        # one full evaluation pass (2100 images) each

The baseline commit is checked out with ``git worktree`` into a temporary folder; "after" is the working tree this
script lives in. Every workload runs in its own subprocess with that tree first on ``PYTHONPATH`` and that tree as
the working folder (its ``configs/`` and ``models/``), interleaved (before, after, before, after, ...) so that load
from other processes hits both alike; the table shows medians over ``--repeats``. The workloads:

* ``eval``: the ``ToyWorldEvaluation`` callback of the tree's ``configs/eval/toyworld.yaml`` run through ``validate``
  (``T2ICLI(...).trainer.validate``) on ``--per-category``
  prompts of each of the 7 categories x ``--images-per-prompt`` seeds, for the base model (finetune + toyworld
  configs: a zero rank-4 adapter) and, ``eval_comat``, for a CoMat-trained model (the comat configs: rank-64 adapters
  on attention, feed-forward and ResNet convolutions, nonzero after a few updates made by the baseline tree; its
  checkpoint is evaluated by both trees). Timed: the pass's own ``val/toy/seconds`` (sampling + judging of all
  items, after the model is loaded).
* ``comat``: ``--comat-steps`` CoMat updates after one warm-up (configs/method/comat.yaml +
  configs/experiment/toyworld.yaml + configs/experiment/toyworld_comat.yaml, batch 4, mixed latents, attribute
  concentration, discriminator), timed from ``on_train_batch_start`` to ``on_train_batch_end``.
* ``refl`` (``--refl``): the same for ReFL with the caption reward (configs/experiment/toyworld_refl_caption.yaml).

Same results: every image's judged verdicts (the per-image records: metrics and clause verdicts) before and after,
the final latents' largest absolute difference, the CoMat/ReFL logged losses of every update and the trained
adapter weights after the last update.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
CATEGORIES = 7
METHOD_CONFIGS = {
    "finetune": ["configs/method/finetune.yaml", "configs/experiment/toyworld.yaml"],
    "comat": ["configs/method/comat.yaml", "configs/experiment/toyworld.yaml", "configs/experiment/toyworld_comat.yaml"],
    "refl": ["configs/method/refl.yaml", "configs/experiment/toyworld.yaml",
             "configs/experiment/toyworld_refl_caption.yaml"],
}


# ------------------------------------------------------------------------------------------------ worker side
def data_overrides(data: Path, method: str) -> list[str]:
    """The ToyWorld inputs from ``data`` instead of ``.cache/toyworld`` (the trees have no build of their own)."""
    args = [f"--data.init_args.train_pairs.path={data}/natural/metadata.jsonl",
            f"--data.init_args.val_pairs.path={data}/natural_val/metadata.jsonl"]
    if method in ("comat", "refl"):
        args.append(f"--data.init_args.train_prompts=[{{path: {data}/prompts/compositional_train.txt}}]")
    return args


def capture_logs(module, logged: list) -> None:
    """Record every ``module.log(name, value)`` of the training steps (the losses of each update)."""
    original = module.log

    def log(name, value, *args, **kwargs):
        if name.startswith("train/"):
            logged.append((name, float(value.detach().float()) if hasattr(value, "detach") else float(value)))
        return original(name, value, *args, **kwargs)

    module.log = log


def worker_eval(a) -> dict:
    import torch
    import yaml

    from t2i_align.cli import T2ICLI

    [toy] = [c for c in yaml.safe_load(Path("configs/eval/toyworld.yaml").read_text())["trainer"]["callbacks"]
             if c["class_path"].endswith("ToyWorldEvaluation")]
    toy = {**toy, "init_args": {**toy["init_args"], "prompts_dir": f"{a.data}/prompts/eval",
                                "per_category": a.per_category, "images_per_prompt": a.images_per_prompt,
                                "per_image": True, "log_samples": 0, "evaluate_before_fit": False,
                                **({"batch_size": a.batch_size} if a.batch_size else {})}}
    out = Path(a.out)
    args = [x for c in METHOD_CONFIGS[a.method] for x in ("--config", c)]
    args += ["--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out}",
             f"--trainer.callbacks={json.dumps([toy], separators=(',', ':'))}", "--data.init_args.val_limit=2",
             *data_overrides(Path(a.data), a.method)]
    tic = time.perf_counter()
    cli = T2ICLI(args=args, run=False)
    model = cli.model
    latents: list[torch.Tensor] = []
    sample = model.sample

    def recording_sample(*args, **kwargs):
        result = sample(*args, **kwargs)
        latents.append(result.latents.detach().float().cpu().clone())
        return result

    model.sample = recording_sample
    if a.profile:  # the main thread's Python profile (a worker thread's half of a split UNet call shows as waiting)
        import cProfile
        import io
        import pstats

        profile = cProfile.Profile()
        [metrics] = profile.runcall(cli.trainer.validate, model, datamodule=cli.datamodule, ckpt_path=a.ckpt)
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(60)
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(30)
        (out / "profile.txt").write_text(text.getvalue())
    else:
        [metrics] = cli.trainer.validate(model, datamodule=cli.datamodule, ckpt_path=a.ckpt)
    total = time.perf_counter() - tic
    torch.save(torch.cat(latents), out / "latents.pt")
    [records] = list(out.glob("toy_eval/per_image_step_*.jsonl"))
    shutil.copy(records, out / "per_image.jsonl")
    images = a.per_category * CATEGORIES * a.images_per_prompt
    return {"seconds": metrics["val/toy/seconds"], "images": images, "total_seconds": total,
            "metrics": {k: v for k, v in metrics.items() if k.startswith("val/toy/") and not k.endswith("seconds")}}


def worker_train(a) -> dict:
    import lightning as L
    import torch

    from t2i_align.cli import T2ICLI

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.tic = 0.0

        def on_train_batch_start(self, *args) -> None:
            self.tic = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            self.times.append(time.perf_counter() - self.tic)

    out = Path(a.out)
    args = [x for c in METHOD_CONFIGS[a.method] for x in ("--config", c)]
    args += ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
             f"--trainer.default_root_dir={out}", "--trainer.callbacks=[]", "--trainer.limit_val_batches=0",
             f"--trainer.max_steps={a.warmup + a.steps}", *data_overrides(Path(a.data), a.method)]
    cli = T2ICLI(args=args, run=False)
    timer = Timer()
    cli.trainer.callbacks.append(timer)
    logged: list = []
    capture_logs(cli.model, logged)
    profiler = None
    if a.profile:
        from torch.profiler import ProfilerActivity, profile, schedule

        profiler = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=a.warmup, warmup=0, active=a.steps))

        class Step(L.Callback):
            def on_train_batch_end(self, *args) -> None:
                profiler.step()

        cli.trainer.callbacks.append(Step())
        profiler.start()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if profiler is not None:
        profiler.stop()
        (out / "profile.txt").write_text(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    if a.save_ckpt:
        cli.trainer.save_checkpoint(a.save_ckpt)
    weights = {k: v.detach().float().cpu().clone() for k, v in cli.model.generator.named_parameters() if v.requires_grad}
    torch.save(weights, out / "weights.pt")
    return {"seconds": statistics.median(timer.times[a.warmup:]), "all_seconds": timer.times, "logged": logged}


def worker_fpcheck(a) -> dict:
    """The after tree only: how far its fast sampling path (``Generator.fast_sampling``) moves the final latents from
    its reference path (peft's wrappers, keys and values every step, one 2-thread call), against how far float32
    rounding itself moves them: the reference path again with the text condition one float32 ulp away
    (``torch.nextafter``). The evaluation's sampler on its first 56 items, with the model of ``--method``/``--ckpt``."""
    import torch
    import yaml

    from t2i_align.cli import T2ICLI
    from t2i_align.diffusion.sampling import SamplingSettings
    from t2i_align.toyworld.evaluation.scoring import load_items

    [toy] = [c for c in yaml.safe_load(Path("configs/eval/toyworld.yaml").read_text())["trainer"]["callbacks"]
             if c["class_path"].endswith("ToyWorldEvaluation")]
    sampling = SamplingSettings(**toy["init_args"]["sampling"])
    args = [x for c in METHOD_CONFIGS[a.method] for x in ("--config", c)]
    args += ["--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={a.out}",
             "--trainer.callbacks=[]", *data_overrides(Path(a.data), a.method)]
    model = T2ICLI(args=args, run=False).model
    if a.ckpt:
        state = torch.load(a.ckpt, map_location="cpu", weights_only=False)["state_dict"]
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys  # checkpoints hold the trained weights
        assert not unexpected and any("lora" in k for k in state), unexpected
    generator = model.generator.eval()
    items = load_items(f"{a.data}/prompts/eval", per_category=a.per_category, images_per_prompt=a.images_per_prompt)[:56]
    prompts, seeds = [it.prompt for it in items], [it.seed for it in items]
    with torch.no_grad():
        condition = generator.encode_prompts(prompts)
        nudged = torch.nextafter(condition, torch.full_like(condition, float("inf")))
        runs = {}
        for name, fast, cond in (("reference", False, condition), ("fast", True, condition), ("ulp", False, nudged)):
            generator.fast_sampling = fast
            runs[name] = generator.sample(prompts, seeds, sampling, embeddings=cond, decode=False).latents
        generator.fast_sampling = True
    ref = runs["reference"]
    return {"seconds": 0.0, "images": len(items), "max_latent": float(ref.abs().max()),
            "fast_vs_reference": float((runs["fast"] - ref).abs().max()),
            "ulp_condition_vs_reference": float((runs["ulp"] - ref).abs().max()),
            "fast_bit_identical": bool(torch.equal(runs["fast"], ref))}


def worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["eval", "train", "fpcheck"])
    p.add_argument("--method", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--per-category", type=int, default=8)
    p.add_argument("--images-per-prompt", type=int, default=3)
    p.add_argument("--ckpt")
    p.add_argument("--batch-size", type=int, help="the evaluation's batch (default: the config's)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--save-ckpt")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    result = {"eval": worker_eval, "train": worker_train, "fpcheck": worker_fpcheck}[a.kind](a)
    (Path(a.out) / "result.json").write_text(json.dumps(result, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------ driver side
def run_worker(tree: Path, args: list[str], log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false"}
    out = Path(args[args.index("--out") + 1])
    with open(log, "a") as f:
        f.write(f"\n$ (cd {tree}) {' '.join(args)}\n")
        f.flush()
        done = subprocess.run([sys.executable, str(HERE), "--worker", *args], cwd=tree, env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"worker failed in {tree} ({' '.join(args)}): see {log}")
    return json.loads((out / "result.json").read_text())


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def compare_eval(before: Path, after: Path) -> dict:
    import torch

    a, b = read_records(before / "per_image.jsonl"), read_records(after / "per_image.jsonl")
    assert [r["key"] for r in a] == [r["key"] for r in b], "the two trees judged different items"
    same = sum(x["scores"] == y["scores"] and x["clauses"] == y["clauses"] for x, y in zip(a, b))
    la, lb = torch.load(before / "latents.pt"), torch.load(after / "latents.pt")
    return {"images": len(a), "identical_verdicts": same, "latents_max_abs_diff": float((la - lb).abs().max()),
            "latents_max_abs": float(la.abs().max()), "latents_bit_identical": bool(torch.equal(la, lb))}


def compare_train(before: Path, after: Path, ra: dict, rb: dict) -> dict:
    import torch

    la, lb = ra["logged"], rb["logged"]
    names = [n for n, _ in la] == [n for n, _ in lb]
    rel = max((abs(x - y) / max(abs(x), 1e-8) for (_, x), (_, y) in zip(la, lb)), default=0.0)
    wa, wb = torch.load(before / "weights.pt"), torch.load(after / "weights.pt")
    common = sorted(set(wa) & set(wb))
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in common)
    scale = max(float(wa[k].abs().max()) for k in common)
    return {"logged_values": len(la), "same_names": names, "loss_max_rel_diff": rel, "weights_compared": len(common),
            "weights_missing": len(set(wa) ^ set(wb)), "weights_max_abs_diff": diff, "weights_max_abs": scale}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="commit of the 'before' tree (e.g. db58a24)")
    p.add_argument("--after", type=Path, default=REPO, help="the 'after' tree (default: this working tree)")
    p.add_argument("--per-category", type=int, default=8, help="evaluation prompts per category (100: a full pass)")
    p.add_argument("--images-per-prompt", type=int, default=3)
    p.add_argument("--comat-steps", type=int, default=4, help="timed CoMat updates (after 1 warm-up)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--refl", action="store_true", help="also time ReFL (caption reward) updates")
    p.add_argument("--skip", nargs="*", default=[], choices=["eval", "eval_comat", "comat"])
    p.add_argument("--keep", type=Path, help="keep the workers' outputs (logs, records, latents) in this folder")
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="t2i-speed-")) if a.keep is None else a.keep
    work.mkdir(parents=True, exist_ok=True)
    log = work / "workers.log"
    base = work / "baseline_tree"
    trees = {"before": base, "after": a.after.resolve()}
    try:
        if not base.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=True)  # a folder removed by hand
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), a.baseline], check=True,
                           stdout=subprocess.DEVNULL)
        commit = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        data = work / "toyworld"
        if not data.exists():
            subprocess.run([sys.executable, "-m", "t2i_align.commands.toyworld_build", str(data), "--natural", "256",
                            "--natural-val", "16"], check=True, cwd=a.after, stdout=subprocess.DEVNULL,
                           env={**os.environ, "PYTHONPATH": str(a.after)})
        common = ["--data", str(data)]
        ev = ["--per-category", str(a.per_category), "--images-per-prompt", str(a.images_per_prompt)]
        train = ["--warmup", "1", "--steps", str(a.comat_steps)]
        ckpt = work / "comat_trained.ckpt"
        results: dict = {}
        for repeat in range(a.repeats):
            for side, tree in trees.items():
                def go(name, args):
                    out = work / f"{name}_{side}_{repeat}"
                    tic = time.perf_counter()
                    r = run_worker(tree, [*args, *common, "--out", str(out)], log)
                    r["out"], r["wall"] = str(out), time.perf_counter() - tic
                    results.setdefault(name, {}).setdefault(side, []).append(r)
                    print(f"  [{repeat}] {name:10s} {side:6s} {r['seconds']:8.2f} s  (worker {r['wall']:.0f} s)", flush=True)

                if "comat" not in a.skip:
                    extra = ["--save-ckpt", str(ckpt)] if side == "before" and not ckpt.exists() else []
                    go("comat", ["train", "--method", "comat", *train, *extra])
                if a.refl:
                    go("refl", ["train", "--method", "refl", *train])
                if "eval" not in a.skip:
                    go("eval", ["eval", "--method", "finetune", *ev])
                if "eval_comat" not in a.skip and ckpt.exists():
                    go("eval_comat", ["eval", "--method", "comat", *ev, "--ckpt", str(ckpt)])

        checks = {}
        if "eval" not in a.skip:
            checks["eval"] = run_worker(trees["after"], ["fpcheck", "--method", "finetune", *ev, *common, "--out",
                                                         str(work / "fpcheck_eval")], log)
        if "eval_comat" not in a.skip and ckpt.exists():
            checks["eval_comat"] = run_worker(trees["after"], ["fpcheck", "--method", "comat", *ev, "--ckpt", str(ckpt),
                                                               *common, "--out", str(work / "fpcheck_eval_comat")], log)
        report(results, checks, commit, a, work)
    finally:
        if a.keep is None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
            shutil.rmtree(work, ignore_errors=True)


def report(results: dict, checks: dict, commit: str, a, work: Path) -> None:
    import platform

    import torch

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; before = {commit}, after = {a.after}")
    print(f"{a.repeats} interleaved repeats (before, after, before, after, ...); median and fastest of each\n")
    print(f"{'workload':44s} {'before':>9s} {'after':>9s} {'speed-up':>9s}   {'fastest':>7s} {'fastest':>7s} {'speed-up':>8s}")
    labels = {"eval": "evaluation pass, base model (s/pass)", "eval_comat": "evaluation pass, CoMat adapter (s/pass)",
              "comat": "CoMat ToyWorld update (s/update)", "refl": "ReFL ToyWorld update (s/update)"}
    for name, sides in results.items():
        b_all, a_all = [r["seconds"] for r in sides["before"]], [r["seconds"] for r in sides["after"]]
        before, after = statistics.median(b_all), statistics.median(a_all)
        print(f"{labels[name]:44s} {before:9.2f} {after:9.2f} {before / after:8.2f}x   {min(b_all):7.2f} {min(a_all):7.2f} "
              f"{min(b_all) / min(a_all):7.2f}x")
        if name.startswith("eval"):
            n = sides["before"][0]["images"]
            print(f"{'  per image (ms), ' + str(n) + ' images':44s} {1000 * before / n:9.1f} {1000 * after / n:9.1f} "
                  f"{'':9s}   {1000 * min(b_all) / n:7.1f} {1000 * min(a_all) / n:7.1f}")
        print(f"{'  all repeats':44s} {' '.join(f'{x:.2f}' for x in b_all)} | {' '.join(f'{x:.2f}' for x in a_all)}")
    print("\nsame results (first repeat of each tree):")
    for name, sides in results.items():
        rb, ra = sides["before"][0], sides["after"][0]
        if name.startswith("eval"):
            c = compare_eval(Path(rb["out"]), Path(ra["out"]))
            metrics_same = rb["metrics"] == ra["metrics"]
            print(f"  {name}: {c['identical_verdicts']}/{c['images']} images with identical judged verdicts "
                  f"({100 * c['identical_verdicts'] / c['images']:.1f} %), all toy metrics identical: {metrics_same}; "
                  f"final latents max |diff| {c['latents_max_abs_diff']:.3g} (max |latent| {c['latents_max_abs']:.3g}, "
                  f"bit-identical: {c['latents_bit_identical']})")
        else:
            c = compare_train(Path(rb["out"]), Path(ra["out"]), rb, ra)
            print(f"  {name}: {c['logged_values']} logged values of {a.comat_steps + 1} updates, same names "
                  f"{c['same_names']}, largest relative difference {c['loss_max_rel_diff']:.3g}; trained weights after "
                  f"the last update: {c['weights_compared']} tensors ({c['weights_missing']} unmatched), max |diff| "
                  f"{c['weights_max_abs_diff']:.3g} (max |w| {c['weights_max_abs']:.3g})")
    for name, c in checks.items():
        print(f"  {name}, float32 rounding (after tree, its first {c['images']} items): fast path vs its reference path "
              f"max |diff| {c['fast_vs_reference']:.3g} (bit-identical: {c['fast_bit_identical']}); the reference path "
              f"with the text condition one float32 ulp away: {c['ulp_condition_vs_reference']:.3g} (max |latent| "
              f"{c['max_latent']:.3g})")
    (work / "speed.json").write_text(json.dumps({"results": results, "checks": checks}, indent=1) + "\n")


if __name__ == "__main__":
    main()
