"""Quality of the exact ToyWorld judge on held-out renders, clean and degraded (blur + noise), and on garbage.

    python experiments/toyworld/judge_quality.py --images 1000
    python experiments/toyworld/judge_quality.py --images 200 --scores   # + the plausibility scores' ranges

Prints object-level accuracy (ground-truth objects matched one-to-one by centre within the object's
radius, with all four attributes right, over objects + unmatched detections), per-attribute accuracy
(same denominator), count accuracy (per image) and time per image; then the detections the judge makes on
images without objects (noise, colour blobs, smeared renders: ``judge.garbage``) and the time per such image.
Exits 1 if a bar is missed (clean >= 99 %, degraded >= 95 % at 64 px; at most 0.04 detections per garbage image).

``--scores`` also prints, per plausibility score (``ToyJudge.SCORES``), its range over the candidates that are
real objects (matched with the right shape, colour and size) in clean, degraded and more blurred (sigma
1.5-2 px) renders, and over all candidates of each kind of garbage image: the data the thresholds
(``ToyJudge`` arguments) are chosen from.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from t2i_align.toyworld.experts.judge import (
    ATTRIBUTES, GARBAGE, ToyJudge, degrade, garbage, held_out_scenes, match, score_renders,
)
from t2i_align.toyworld.world import render

BARS = {"clean": 0.99, "degraded": 0.95}
GARBAGE_BAR = 0.04  # detections per garbage image
QUANTILES = (0.0, 0.01, 0.5, 0.99, 1.0)


def score_table(judge: ToyJudge, scenes, size: int, garbage_images: int, seed: int) -> None:
    """Per score, its quantiles over real objects of renders and over the candidates of garbage images."""
    groups: dict[str, list[dict[str, float]]] = {}
    conditions = {"clean": None, "degraded": (0.5, 1.0), "blur 1.5-2": (1.5, 2.0)}
    for scene in scenes:
        image = render(scene, size=size)[0]
        for condition, blur in conditions.items():
            arr = image if blur is None else degrade(image, np.random.default_rng(scene.noise_seed + 1), blur=blur)
            found = judge.candidates(arr)
            for i, j in match([d for d, _ in found], scene.objects):
                obj, det = scene.objects[i], found[j][0]
                if (obj.shape, obj.colour, obj.size) == (det.shape, det.colour, det.size):
                    groups.setdefault(condition, []).append(found[j][1])
    for kind in GARBAGE:
        rng = np.random.default_rng(seed)
        for _ in range(garbage_images):
            groups.setdefault(kind, []).extend(scores for _, scores in judge.candidates(garbage(kind, rng, size)))
    lo, hi = judge.coverage_range
    rules = {
        "mask_area": f"<= {judge.max_area:g}", "coverage": "in [{:.0f}, {:.0f}]".format(*judge.coverage_bounds),
        "purity": f">= {judge.min_purity:g}", "background": f"<= {judge.max_background:g}",
        "fit": f">= {judge.min_fit:g}", "template_ratio": f"in [{lo:g}, {hi:g}]", "sharpness": "> 1",
    }
    print(f"\nplausibility scores: quantiles {', '.join(f'{q:g}' for q in QUANTILES)} (real objects of renders;"
          f" all candidates of {garbage_images} garbage images per kind)")
    for name in ToyJudge.SCORES:
        print(f"{name} (kept if {rules[name]})")
        for group, rows in groups.items():
            values = np.array([r[name] for r in rows])
            cells = " ".join(f"{v:8.3f}" for v in np.quantile(values, QUANTILES)) if len(values) else "(none)"
            print(f"  {group:12s} n={len(values):5d} {cells}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="held-out scenes per condition")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--seed", type=int, default=9_000_000, help="first scene seed (tuning used seeds < 2e6)")
    parser.add_argument("--garbage-images", type=int, default=100, help="garbage images per kind")
    parser.add_argument("--scores", action="store_true", help="print the plausibility scores' ranges")
    args = parser.parse_args(argv)

    judge = ToyJudge()
    scenes = held_out_scenes(args.images, args.seed)
    print(f"{args.images} held-out scenes ({sum(len(s.objects) for s in scenes)} objects), {args.size} px")
    print(f"{'condition':10s} {'object':>7s} " + " ".join(f"{a:>7s}" for a in ATTRIBUTES) + f" {'count':>7s} {'ms/img':>7s}  bar")
    failed = False
    for condition, bar in BARS.items():
        score = score_renders(judge, scenes, args.size, degraded=condition == "degraded")
        ms = 1000 * score.seconds / args.images  # judge only (not rendering or degrading)
        ok = score.accuracy >= bar
        failed |= not ok
        attrs = " ".join(f"{score.attribute_accuracy(a):7.2%}" for a in ATTRIBUTES)
        print(f"{condition:10s} {score.accuracy:7.2%} {attrs} {score.count_accuracy:7.2%} {ms:7.1f}  "
              f">= {bar:.0%} {'ok' if ok else 'MISSED'}")

    print(f"\n{args.garbage_images} garbage images per kind (no objects), {args.size} px")
    print(f"{'kind':12s} {'detections':>10s} {'per image':>9s} {'ms/img':>7s}  bar")
    for kind in GARBAGE:
        rng = np.random.default_rng(args.seed)
        images = [garbage(kind, rng, args.size) for _ in range(args.garbage_images)]
        start = time.perf_counter()
        found = sum(len(judge.detect(image)) for image in images)
        ms = 1000 * (time.perf_counter() - start) / args.garbage_images
        rate = found / args.garbage_images
        ok = rate <= GARBAGE_BAR
        failed |= not ok
        print(f"{kind:12s} {found:10d} {rate:9.3f} {ms:7.1f}  <= {GARBAGE_BAR:g} {'ok' if ok else 'MISSED'}")

    if args.scores:
        score_table(judge, scenes, args.size, args.garbage_images, args.seed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
