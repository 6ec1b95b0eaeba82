"""Every ToyWorld quality bar, measured and printed:
``python -m t2i_align.commands.toyworld_quality [--models models/toyworld] [--parts judge clip captioner pipeline]``.

* judge: object-level accuracy on held-out renders, clean (>= 99 %) and degraded with blur + noise (>= 95 %);
* captioner: CoMat B.3 sensitivity (true caption more likely than each corruption, >= 95 %) and greedy
  captions that parse to the right scene (>= 90 %), on held-out scenes of the training mix and of the
  (never trained on) evaluation prompts;
* CLIP: retrieval and corruption accuracy (reported; no bar in the issue);
* base pipeline: canonical single-object prompts judged right in shape and colour (>= 90 %), and the
  alignment gap: ``all_clauses`` per evaluation category, plus colour binding on counter-canonical pairs
  (expected well under 60 %). ``--grid`` saves a sample grid.

Exits 1 if a bar is missed. ``--out`` writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from t2i_align.toyworld.evaluation.quality import BARS, CEILINGS, PARTS, judge_quality, pipeline_quality


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("models/toyworld"))
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    p.add_argument("--judge-images", type=int, default=1000)
    p.add_argument("--captioner-images", type=int, default=300)
    p.add_argument("--per-category", type=int, default=50, help="evaluation prompts per category (pipeline)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", type=Path, help="PNG: canonical singles, then evaluation prompts")
    p.add_argument("--out", type=Path, help="JSON with every number")
    a = p.parse_args(argv)

    results: dict[str, float] = {}
    if "judge" in a.parts:
        results.update(judge_quality(a.judge_images))
    if "clip" in a.parts:
        from t2i_align.toyworld.experts.clip_model import clip_quality

        for source in ("mix", "eval"):
            q = clip_quality(a.models / "clip", source=source, device=a.device)
            results.update({f"clip/{source}/{k}": v for k, v in q.items() if k not in ("n", "pairs")})
    if "captioner" in a.parts:
        from t2i_align.toyworld.experts.captioner import captioner_quality

        for source in ("mix", "eval"):
            q = captioner_quality(a.models / "captioner", n=a.captioner_images, source=source, device=a.device)
            results.update({f"captioner/{source}/{k}": v for k, v in q.items()
                            if isinstance(v, float) and not k.startswith("pairs") and k != "n"})
    if "pipeline" in a.parts:
        results.update(pipeline_quality(str(a.models / "pipeline"), a.per_category, device=a.device, grid=a.grid))

    missed = False
    for key, value in results.items():
        verdict = ""
        if key in BARS:
            ok = value >= BARS[key]
            verdict = f">= {BARS[key]:.0%} {'ok' if ok else 'MISSED'}"
        elif key in CEILINGS:
            ok = value < CEILINGS[key]
            verdict = f"< {CEILINGS[key]:.0%} {'ok' if ok else 'MISSED'}"
        else:
            ok = True
        missed |= not ok
        print(f"{key:48s} {value:7.3f}  {verdict}")
    if a.out:
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if missed else 0



if __name__ == "__main__":
    sys.exit(main())
