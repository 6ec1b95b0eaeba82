"""MultiGen's MG_k of images exported in the ``multigen`` layout (:mod:`t2i_align.callbacks.multigen`)::

    python -m t2i_align.commands.multigen EXPORT_DIR --prompt-file coco_obj_comp_5_1k.json \\
        [--images-per-prompt 10] [--detector CLASS_PATH] [--detector-args JSON] [--batch-size 16]

prints the metrics and writes them, with every image's detections, to ``EXPORT_DIR/multigen_scores.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from t2i_align.callbacks.multigen import score_folder


def main(argv: Sequence[str] | None = None) -> None:
    from t2i_align.io import atomic_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--prompt-file", required=True, type=Path)
    p.add_argument("--images-per-prompt", type=int, default=10)
    p.add_argument("--detector", default="t2i_align.experts.detector.OwlV2Detector")
    p.add_argument("--detector-args", default="{}", help="the detector's keyword arguments as JSON")
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)
    from t2i_align.common import build_from_class_path

    try:
        detector = build_from_class_path(a.detector, json.loads(a.detector_args), "--detector")
    except json.JSONDecodeError as e:
        raise SystemExit(f"--detector-args: invalid JSON ({e.msg})") from None
    result = score_folder(a.folder, a.prompt_file, detector, a.images_per_prompt, a.batch_size)
    with atomic_path(a.folder / "multigen_scores.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["metrics"]))



if __name__ == "__main__":
    main()
