"""The fine-stage control's case selection and its free-space mask."""

import numpy as np

from t2i_align.studies.fine_stage_control import fixable, free_disc, missing_phrase


def record(*clauses):
    return {"clauses": [*clauses, {"clause": "to the left of", "verdict": "ok"}]}


def test_fixable_means_every_object_drawn_and_some_attribute_wrong():
    ok = {"verdict": "ok", "right": 1, "wrong_attribute": 0, "missing": 0}
    wrong = {"verdict": "wrong_attribute", "right": 0, "wrong_attribute": 1, "missing": 0}
    missing = {"verdict": "missing", "right": 0, "wrong_attribute": 0, "missing": 1}
    assert fixable(record(ok, wrong)) and not fixable(record(ok, ok)) and not fixable(record(wrong, missing))
    prompt = "a red circle to the left of a blue square"
    assert missing_phrase(record(ok, missing), prompt).shape == "square"
    assert missing_phrase(record(ok, wrong), prompt) is None


def test_the_free_disc_keeps_away_from_drawn_objects():
    drawn = np.zeros((64, 64), dtype=bool)
    drawn[:, :30] = True  # the left part is taken
    disc = free_disc(drawn, 64, 10.5).numpy()
    _, xs = np.nonzero(disc)
    assert xs.mean() == 48 and not (disc & drawn).any()
    assert abs(disc.sum() - np.pi * 10.5**2) < 0.1 * np.pi * 10.5**2
