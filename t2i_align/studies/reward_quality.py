"""How well ARL's and ReFL's learned rewards rank ToyWorld samples, and what ARL's selection keeps, measured against
the judge (an oracle reference), on the base model's samples and, for trained models, on their own::

    python -m t2i_align.commands.toyworld_build .cache/toyworld --natural 2000 --natural-val 512
    python -m t2i_align.studies.reward_quality --out experiments/results/toyworld_reward_quality
    python -m t2i_align.studies.reward_quality --trained ARL "ARL (oracle selection)"   # after their fits

Each model's 160 ARL training prompts x 10 candidates are scored by ARL's caption, CLIP and SAM rewards, CoMat's
captioner likelihood and the judge
(``configs/eval/toyworld_rewards.yaml``, :class:`~t2i_align.callbacks.reward_agreement.RewardAgreement`). Reported:
the share of kept candidates that meet every clause under each selection rule (random = the mean over the
candidates; ARL's rank sum; each reward alone; the judge: the best possible), its paired difference from random
(prompts resampled, 95 %), and each reward's within-prompt pairwise agreement with the judge (0.5 = chance). A
trained model whose reward agreement falls while it was trained on that reward has learned to please the reward,
not the judge. The training prompts are not the evaluation prompts: nothing here is tuned on the latter.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from t2i_align.callbacks.reward_agreement import pairwise_agreement
from t2i_align.rewards.ranking import select_candidates
from t2i_align.stats import paired_bootstrap
from t2i_align.studies import report
from t2i_align.studies.comat_ablation import ARMS as COMAT_ARMS
from t2i_align.studies.compare_methods import METHODS
from t2i_align.studies.harness import BASE, checkpoint, evaluate

CONFIG = "configs/eval/toyworld_rewards.yaml"
ARL_REWARDS = ("caption", "clip", "sam")
REWARDS = (*ARL_REWARDS, "captioner")  # and CoMat's image-to-text score
TRAINED = {**METHODS, **COMAT_ARMS}  # e.g. "CA": does concept activation teach the images to please the captioner?


def read_table(root: str | Path) -> dict[str, np.ndarray]:
    """``name -> [prompts, K]`` scores (rewards and ``reference``) from a pass's ``reward_agreement`` records."""
    [path] = sorted(Path(root).glob("reward_agreement/step_*.jsonl"))
    groups: dict[str, list[dict]] = defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        groups[row["key"].rsplit("/", 1)[0]].append(row)
    names = [k for k in next(iter(groups.values()))[0] if k not in ("key", "prompt", "seed")]
    return {n: np.array([[r[n] for r in rows] for rows in groups.values()]) for n in names}


def selection(table: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per rule: the share of prompts whose kept candidate meets every clause (judge score >= 1), and its paired
    difference from keeping a random candidate."""
    met = (table["reference"] >= 1).astype(float)
    rows = np.arange(len(met))
    scores = {n: torch.tensor(table[n]) for n in REWARDS if n in table}
    kept = {"rank sum (ARL)": select_candidates({n: s for n, s in scores.items() if n in ARL_REWARDS}).numpy(),
            **{n: select_candidates({n: s}).numpy() for n, s in scores.items()},
            "judge (oracle)": table["reference"].argmax(1)}
    random = {str(i): ("train", float(v)) for i, v in enumerate(met.mean(1))}
    out = {"random": {"all_clauses": float(met.mean())}}
    for rule, index in kept.items():
        chosen = {str(i): ("train", float(v)) for i, v in enumerate(met[rows, index])}
        d = paired_bootstrap(random, chosen)
        out[rule] = {"all_clauses": d.method, "minus_random": [d.difference, d.low, d.high]}
    return out


def agreement(table: dict[str, np.ndarray], resamples: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """Each reward's within-prompt pairwise agreement with the judge, with a 95 % interval (prompts resampled)."""
    rng = np.random.default_rng(seed)
    reference = torch.tensor(table["reference"])
    out = {}
    for n in REWARDS:
        if n not in table:
            continue
        s = torch.tensor(table[n])
        boot = [pairwise_agreement(s[p], reference[p]) for p in rng.integers(0, len(s), (resamples, len(s)))]
        low, high = np.nanquantile(boot, [0.025, 0.975])
        out[n] = [pairwise_agreement(s, reference), float(low), float(high)]
    return out


def markdown(results: dict) -> str:
    models = results["models"]
    lines = [f"# How the rewards rank ToyWorld samples (commit {results['commit']})", "",
             "Kept candidates meeting every clause, per selection rule (160 training prompts x 10 candidates); "
             "the difference from a random candidate with its paired 95 % interval. The judge is the evaluation "
             "judge: an **oracle**. The SAM reward tags objects with the judge's detections (partly oracle).", "",
             "| Rule | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    rules = list(next(iter(models.values()))["selection"])
    for rule in rules:
        cells = []
        for m in models.values():
            s = m["selection"][rule]
            diff = s.get("minus_random")
            cells.append(report.fmt(s["all_clauses"]) + ("" if diff is None else
                         f" ({diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}])"))
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    lines += ["", "Within-prompt pairwise agreement of each reward with the judge (0.5 = chance), 95 % interval:", "",
              "| Reward | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for n in REWARDS:
        cells = [("{:.3f} [{:.3f}, {:.3f}]".format(*m["agreement"][n]) if n in m["agreement"] else "–")
                 for m in models.values()]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trained", nargs="*", default=[], choices=list(TRAINED),
                   help="also measure on these trained models' samples (their fits must have finished)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/toyworld_reward_quality"))
    p.add_argument("--reevaluate", action="store_true")
    a = p.parse_args(argv)

    results = report.new_results("reward_quality", {"config": CONFIG, "trained": a.trained})
    models = [BASE] + [TRAINED[n].replace(checkpoint=str(checkpoint(TRAINED[n].run_dir))) for n in a.trained]
    for model in models:
        result = evaluate(model, label="rewards", reevaluate=a.reevaluate, eval_config=CONFIG)
        table = read_table(result["root"])
        report.add_model(results, model, rewards=result, selection=selection(table), agreement=agreement(table))
    print(report.write_report(a.out, results, markdown))


if __name__ == "__main__":
    main()
