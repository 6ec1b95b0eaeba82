"""The reward-quality study's tables from a pass's per-candidate records."""

import json

import pytest

from t2i_align.studies import report
from t2i_align.studies.reward_quality import agreement, markdown, read_table, selection


def write_records(root, rows):
    folder = root / "reward_agreement"
    folder.mkdir(parents=True)
    (folder / "step_0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_selection_and_agreement_from_records(tmp_path):
    # 4 prompts x 3 candidates; the judge's score >= 1 means every clause is met (candidate 2 of each prompt).
    # "caption" agrees with the judge, "clip" prefers candidate 0, "sam" is constant.
    rows = [{"key": f"train/p{i}/{k}", "prompt": f"p{i}", "seed": k, "reference": [0.2, 0.4, 1.5][k],
             "caption": float(k), "clip": float(-k), "sam": 0.5, "captioner": float(-k)} for i in range(4) for k in range(3)]
    write_records(tmp_path, rows)
    table = read_table(tmp_path)
    assert table["reference"].shape == (4, 3)
    s = selection(table)
    assert s["random"]["all_clauses"] == pytest.approx(1 / 3)
    assert s["caption"]["all_clauses"] == s["judge (oracle)"]["all_clauses"] == 1.0
    assert s["clip"]["all_clauses"] == 0.0
    assert s["sam"]["all_clauses"] == 0.0  # all tied: the first candidate is kept
    assert s["caption"]["minus_random"][0] == pytest.approx(2 / 3)
    # ARL's rank sum is over caption, clip and sam only: captioner's vote (with clip's) would outweigh caption's
    assert s["rank sum (ARL)"]["all_clauses"] == 0.0 and s["captioner"]["all_clauses"] == 0.0
    a = agreement(table, resamples=50)
    assert a["caption"][0] == 1.0 and a["clip"][0] == 0.0 and a["sam"][0] == 0.5
    results = report.new_results("reward_quality", {})
    results["models"]["Base"] = {"selection": s, "agreement": a}
    text = markdown(results)
    assert "| judge (oracle) | 1.000 (+0.667" in text and "| clip | 0.000 [0.000, 0.000] |" in text
