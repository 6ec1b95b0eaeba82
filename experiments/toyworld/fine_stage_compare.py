"""RealignDiff's fine stage on ToyWorld (the paper's Table II claim: the fine stage improves attribute binding and
relations on top of the coarse stage): before (plain sampling, which is the fine stage's first pass) and after (its
second pass) on the base and on the best coarse-stage model, the same evaluation prompts and seeds::

    python -m t2i_align.commands.toyworld_build .cache/toyworld --natural 2000 --natural-val 512
    python experiments/toyworld/tokencompose_compare.py      # the trained candidates and their chosen checkpoints
    python experiments/toyworld/fine_stage_compare.py --out experiments/results/toyworld_fine_stage

* The fine stage uses ToyWorld's tagger, likelihood judge and segmenter (``configs/experiment/toyworld_fine_stage.yaml``),
  which are the evaluation judge itself: every "after" number is an **oracle upper bound** of what real experts give.
* The coarse-stage model is the trained checkpoint with the best *validation* all_clauses among the arms of
  ``--candidates`` (a results JSON of ``val_stopping.py``; the evaluation prompts play no part in the choice). The
  ReFL caption-reward LoRA, RealignDiff's own coarse stage, made ToyWorld worse at our budget (README), so it is not
  the best one.
* Each model is scored as ``compare_methods.py`` scores methods: every metric of ``configs/eval/toyworld.yaml``
  and the toy metrics on every evaluation prompt x ``--seeds`` images, paired bootstrap 95 % intervals of
  after - before (and of the coarse model + fine stage - the base). Wall time per image of one pass (plain) and
  two passes (the fine stage) comes from the full passes, on whatever else the machine ran.
* ``<out>.json`` has everything; ``<out>.md`` the tables; ``<out>_grid.png`` the first pass, the kept objects'
  masks (green: certain, yellow: may, red: unlikely) and the second pass for one prompt per category (the coarse
  model; the base with ``--base-only``). Finished passes are reused (``runs/compare/``) unless ``--reevaluate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import (  # noqa: E402  (the sibling script: same passes, same tables)
    CATEGORIES, METHODS, config_args, difference_table, fmt, full_pass, full_toy_callbacks, git_commit,
    paired_differences, validate,
)

from t2i_align.io import atomic_path  # noqa: E402

FINE = ["configs/method/fine_stage.yaml", "configs/experiment/toyworld.yaml", "configs/experiment/toyworld_fine_stage.yaml"]
FULL_UNET = "configs/model/full_unet.yaml"  # generator.lora: null, for a whole-UNet checkpoint


def coarse_candidate(results_path: Path) -> dict:
    """The arm of a ``val_stopping.py`` results file with the best validation all_clauses at its chosen step."""
    results = json.loads(results_path.read_text())
    name, arm = max(results["arms"].items(),
                    key=lambda kv: kv[1]["curve"][str(kv[1]["step"])]["all_clauses"]["method"])
    value = arm["curve"][str(arm["step"])]["all_clauses"]["method"]
    return {"name": f"{name} (step {arm['step']})", "configs": arm["configs"], "checkpoint": arm["checkpoint"],
            "validation_all_clauses": value}


def fine_configs(ckpt: str | None) -> list[str]:
    """The fine stage with the generator settings of ``ckpt``: the base's LoRA, or ``lora: null`` for a checkpoint of
    the whole UNet (no LoRA weights in it)."""
    if ckpt is None:
        return FINE
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return FINE + ([] if any("lora_" in k for k in state) else [FULL_UNET])


def cached_validate(stack: list[str], ckpt: Path | None, root: Path, reevaluate: bool) -> dict:
    """``validate`` of ``compare_methods.py``, reused from ``root/validate.json`` when it ran on this checkpoint."""
    done = root / "validate.json"
    if done.exists() and not reevaluate:
        result = json.loads(done.read_text())
        if result["checkpoint"] == (str(ckpt) if ckpt else None):
            return result
    result = {**validate(stack, ckpt, root), "checkpoint": str(ckpt) if ckpt else None}
    with atomic_path(done) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def images_of(records: str) -> int:
    return sum(1 for _ in Path(records).open())


def timing(result: dict) -> float:
    return result["seconds"] / images_of(result["per_image"])


def grid(configs: list[str], ckpt: str | None, out: Path, prompts_dir: Path, seed: int = 0) -> None:
    """First pass, masks (each kept object's mask tinted by its score) and second pass, one prompt per category."""
    from PIL import Image

    from t2i_align.cli import T2ICLI

    cli = T2ICLI(args=[*config_args(configs), "--trainer.logger=false"], run=False)
    module = cli.model.eval()
    if ckpt:
        module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"], strict=False)
    prompts = [(prompts_dir / f"{c}.txt").read_text().splitlines()[0] for c in CATEGORIES]
    kw = dict(num_inference_steps=25, guidance_scale=5.0)
    with torch.no_grad():
        first = module.generator.sample(prompts, [seed] * len(prompts), **kw).images.float()
        second = module.sample(prompts, [seed] * len(prompts), **kw).images.float()
    masks = torch.zeros_like(first)
    colours = {"certain": (0.2, 1.0, 0.2), "may": (1.0, 0.8, 0.1), "unlikely": (1.0, 0.2, 0.2)}
    for i, objects in enumerate(module.last_objects):
        for o in objects:
            masks[i][:, o.mask] = torch.tensor(colours[o.label])[:, None]
    rows = [torch.cat(list(x), dim=2) for x in (first, 0.5 * first + 0.5 * masks, second)]
    image = torch.cat(rows, dim=1).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
    with atomic_path(out) as tmp:
        Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(tmp, format="PNG")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=Path, default=Path("experiments/results/toyworld_tokencompose.json"))
    p.add_argument("--out", type=Path, default=Path("experiments/results/toyworld_fine_stage"))
    p.add_argument("--full-per-category", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--reevaluate", action="store_true")
    p.add_argument("--base-only", action="store_true", help="the base model alone (before the candidates exist)")
    a = p.parse_args(argv)

    coarse = None if a.base_only else coarse_candidate(a.candidates)
    full = full_toy_callbacks(a.full_per_category, a.seeds)
    models = {"Base": (METHODS["Finetune"][0], None, "base")}
    if coarse:
        models[coarse["name"]] = (coarse["configs"], coarse["checkpoint"], Path(coarse["checkpoint"]).parts[1])
    results: dict = {"commit": git_commit(), "coarse": coarse, "full_per_category": a.full_per_category,
                     "seeds": a.seeds, "models": {}}
    for name, (configs, ckpt, tag) in models.items():
        ckpt_path = Path(ckpt) if ckpt else None
        step = f"_step{Path(ckpt).stem.split('step=')[-1]}" if ckpt else ""
        model = {}
        for stage, stack, root in (("before", configs, f"runs/compare/{tag}{step}"),
                                   ("after", fine_configs(ckpt), f"runs/compare/fine_{tag}{step}")):
            model[stage] = {"configs": stack, "validate": cached_validate(stack, ckpt_path, Path(root), a.reevaluate),
                            "full_toy": full_pass(stack, ckpt_path, Path(f"{root}_full"), full, a.reevaluate)}
            model[stage]["seconds_per_image"] = timing(model[stage]["full_toy"])
            print(f"{name} {stage}: done", file=sys.stderr, flush=True)
        model["differences"] = paired_differences(model["before"]["full_toy"]["per_image"],
                                                  model["after"]["full_toy"]["per_image"])
        results["models"][name] = model
    lines = ["The fine stage's experts are the ToyWorld judge: every 'after' is an **oracle upper bound**.", ""]
    if coarse:
        base, top = results["models"]["Base"], results["models"][coarse["name"]]
        results["two_stage_vs_base"] = paired_differences(base["before"]["full_toy"]["per_image"],
                                                          top["after"]["full_toy"]["per_image"])
        lines += [f"Coarse-stage model: {coarse['name']} (validation all_clauses {coarse['validation_all_clauses']:.3f}, "
                  f"the best of `{a.candidates}`).", ""]
    for name, model in results["models"].items():
        lines += [f"{name}: after (fine stage) - before (plain sampling), {a.full_per_category} prompts per category "
                  f"x {a.seeds} seeds, paired 95 % intervals:", ""]
        lines += [*difference_table({"methods": {"+ fine stage": {"differences": model["differences"]}}}), ""]
    if coarse:
        lines += [f"{coarse['name']} + fine stage - the base (both stages against the base):", ""]
        lines += [*difference_table({"methods": {"two stages": {"differences": results["two_stage_vs_base"]}}}), ""]
    columns = [(n, s) for n in results["models"] for s in ("before", "after")]
    lines += ["| Metric | " + " | ".join(f"{n} ({'+ fine stage' if s == 'after' else 'plain'})" for n, s in columns) + " |",
              "|---|" + "---|" * len(columns)]
    metrics = [results["models"][n][s]["validate"]["metrics"] for n, s in columns]
    keys = [k for k in metrics[0] if k.startswith(("fid", "clip_")) and not k.endswith("/seconds")]
    for key in [*keys, "tifa_toyjudge/average"]:
        lines.append(f"| {key} | " + " | ".join(fmt(m.get(key), 2) for m in metrics) + " |")
    lines.append("| seconds per image (full pass) | " + " | ".join(
        fmt(results["models"][n][s]["seconds_per_image"], 3) for n, s in columns) + " |")
    text = "\n".join(lines) + "\n"
    for suffix, content in ((".json", json.dumps(results, indent=2) + "\n"), (".md", text)):
        with atomic_path(a.out.with_suffix(suffix)) as tmp:
            tmp.write_text(content)
    ckpt = coarse["checkpoint"] if coarse else None
    grid(fine_configs(ckpt), ckpt, a.out.parent / f"{a.out.name}_grid.png", Path(".cache/toyworld/prompts/eval"))
    print(text)


if __name__ == "__main__":
    main()
