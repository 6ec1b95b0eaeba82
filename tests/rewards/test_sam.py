"""SAM reward: answer parsing, the (S - 2L) / (2L) normalisation, ToyWorld's exact experts, the LM judge."""

import pytest
import torch

from t2i_align.experts.likelihood import LABELS, CausalLMJudge, parse_likelihood
from t2i_align.rewards import SAMReward
from t2i_align.rewards.sam import sam_score
from t2i_align.toyworld.experts.sam_reward import ToyLikelihoodJudge, ToyTagger
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


def test_toy_judge_rules():
    judge = ToyLikelihoodJudge()
    prompt = "a red circle and a striped blue square"
    assert judge(prompt, ["big plain red circle", "small striped blue square", "small plain blue square",
                          "big plain green circle", "big plain yellow star"]) == \
        ["certain", "certain", "may", "may", "unlikely"]


def test_toyworld_sam_reward_on_exact_renders():
    reward = SAMReward(ToyTagger(), ToyLikelihoodJudge())
    prompt = "a red circle to the left of a blue square"
    right = RenderingGenerator().sample([prompt], [0]).images
    swapped = RenderingGenerator(swap_colours=True).sample([prompt], [0]).images  # blue circle, red square
    other = RenderingGenerator().sample(["a green triangle to the left of a yellow star"], [0]).images
    scores = reward(torch.cat([right, swapped, other]), [prompt] * 3)
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.0, -0.5]))  # certain x2, may x2, unlikely x2
    assert reward(torch.ones(1, 3, 64, 64), [prompt]).item() == -0.5  # nothing detected


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
