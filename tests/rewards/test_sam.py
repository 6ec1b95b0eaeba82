"""SAM reward: answer parsing, the (S - 2L) / (2L) normalisation, ToyWorld's exact experts, the LM judge."""

import numpy as np
import pytest
import torch

from t2i_align.experts.likelihood import LABELS, CausalLMJudge, parse_likelihood
from t2i_align.rewards import SAMReward
from t2i_align.rewards.sam import sam_score
from t2i_align.toyworld.experts.sam_reward import ToyLikelihoodJudge, ToyTagger
from t2i_align.toyworld.world import Obj, Scene, parse_prompt, render
from tests.helpers import RenderingGenerator


@pytest.mark.parametrize("answer, label", [
    ("certain", "certain"), (" Certainly, it is there.", "certain"), ("Yes.", "certain"),
    ("may", "may"), ("It might be there", "may"), ("Possibly", "may"), ("likely", "may"),
    ("Unlikely.", "unlikely"), ("no", "unlikely"), ("It is not likely", "unlikely"),
    ("unlikely, but it may", "unlikely"),  # the earliest word decides
    ("Not sure.", "may"), ("I am not certain", "may"), ("unsure", "may"),  # uncertain, not a negation
    ("banana", "may"),  # nothing recognised: the default
])
def test_free_form_answers_parse_to_labels(answer, label):
    assert parse_likelihood(answer) == label


def test_code_normalisation():
    assert sam_score(["certain"] * 3) == 0.5
    assert sam_score(["unlikely", "unlikely"]) == -0.5
    assert sam_score(["certain", "may", "unlikely"]) == 0.0
    assert sam_score(["certain", "may"]) == 0.25
    assert sam_score([]) == -0.5


TAGS = ["big plain red circle", "small striped blue square", "small plain blue square", "big plain green circle",
        "big plain yellow star"]


def test_toy_judge_labels_the_category():
    """FineRewards' SAM reward asks about Tag2Text tags, i.e. object categories: a tag whose shape the prompt names
    is "certain" whatever its colour, size or texture; the others are "unlikely"."""
    prompt = "a red circle and a striped blue square"
    assert ToyLikelihoodJudge()(prompt, TAGS) == ["certain", "certain", "certain", "certain", "unlikely"]
    assert ToyLikelihoodJudge()("two green stars", TAGS) == ["unlikely"] * 4 + ["certain"]


def test_toy_judge_attribute_aware_option():
    """``attributes=True`` (the former rule, for ablations): "may" when a stated colour/size/texture differs."""
    judge = ToyLikelihoodJudge(attributes=True)
    assert judge("a red circle and a striped blue square", TAGS) == ["certain", "certain", "may", "may", "unlikely"]


def test_toy_judge_description_keeps_the_attributes():
    judge = ToyLikelihoodJudge()
    assert judge.describe("a red circle and a striped blue square", TAGS) == \
        ["red circle", "striped blue square", "striped blue square", "red circle", None]


def test_toyworld_sam_reward_on_exact_renders():
    reward = SAMReward(ToyTagger(), ToyLikelihoodJudge())
    prompt = "a red circle to the left of a blue square"
    right = RenderingGenerator().sample([prompt], [0]).images
    swapped = RenderingGenerator(swap_colours=True).sample([prompt], [0]).images  # blue circle, red square
    other = RenderingGenerator().sample(["a green triangle to the left of a yellow star"], [0]).images
    scores = reward(torch.cat([right, swapped, other]), [prompt] * 3)
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.5, -0.5]))  # certain x2 (categories), twice; unlikely x2
    assert reward(torch.ones(1, 3, 64, 64), [prompt]).item() == -0.5  # nothing detected
    aware = SAMReward(ToyTagger(), ToyLikelihoodJudge(attributes=True))
    torch.testing.assert_close(aware(torch.cat([right, swapped, other]), [prompt] * 3), torch.tensor([0.5, 0.0, -0.5]))


def rendered(objects: list[Obj], prompt: str) -> torch.Tensor:
    image, _ = render(Scene(parse_prompt(prompt), tuple(objects)))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()[None] / 255


def test_sam_reward_prefers_a_wrong_colour_object_to_a_missing_one():
    """Drawing the asked-for square in the wrong colour scores at least as well as leaving it out: the reward
    scores categories (FineRewards Eq. 6), attributes are the fine stage's and the other rewards' business."""
    prompt = "a red circle to the left of a blue square"
    circle = Obj("circle", "red", "big", "plain", 18.0, 32.0)
    wrong = rendered([circle, Obj("square", "green", "big", "plain", 46.0, 32.0)], prompt)
    missing = rendered([circle], prompt)
    assert ToyTagger().tags(torch.cat([wrong, missing])) == [["big plain red circle", "big plain green square"],
                                                             ["big plain red circle"]]
    reward = SAMReward(ToyTagger(), ToyLikelihoodJudge())
    with_wrong, without = reward(torch.cat([wrong, missing]), [prompt] * 2).tolist()
    assert with_wrong >= without
    assert (with_wrong, without) == (0.5, 0.5)


def test_sam_reward_rejects_a_judge_that_answers_off_the_label_set():
    class Bad:
        def __call__(self, prompt, tags):
            return ["definitely"] * len(tags)

    reward = SAMReward(ToyTagger(), Bad())
    with pytest.raises(RuntimeError, match="expected one of"):
        reward(RenderingGenerator().sample(["a red circle"], [0]).images, ["a red circle"])


def test_lm_judge_asks_each_tag_in_a_fresh_context(tiny_lm):
    judge = CausalLMJudge(tiny_lm, max_new_tokens=4)
    asked = []
    answer = judge.answer
    judge.answer = lambda question: (asked.append(question), answer(question))[1]
    labels = judge("a red circle", ["red circle", "blue square"])
    assert len(labels) == 2 and set(labels) <= set(LABELS)
    assert ['"a red circle"' in q and f'"{t}"' in q for q, t in zip(asked, ["red circle", "blue square"])] == [True, True]
    # an answer does not depend on what was asked before it, and decoding is greedy (repeatable)
    assert judge("a red circle", ["blue square"]) == labels[1:]
    assert answer(asked[1]) == answer(asked[1])
