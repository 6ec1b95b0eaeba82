"""RewardAgreement: rewards ranked against a reference on a model's own candidates."""

import json

import lightning as L
import pytest
import torch

from t2i_align.callbacks.reward_agreement import (
    RewardAgreement,
    concordance,
    kept_reference,
    pairwise_agreement,
)
from t2i_align.rewards.base import Reward
from t2i_align.toyworld.experts.judge_reward import JudgeReward
from tests.helpers import RenderingGenerator, RenderingModule


def test_agreement_of_perfect_reversed_and_constant_rewards():
    reference = torch.tensor([[0.0, 1.0, 2.0], [2.0, 2.0, 0.0]])
    assert pairwise_agreement(reference * 3 + 1, reference) == 1.0
    assert pairwise_agreement(-reference, reference) == 0.0
    assert pairwise_agreement(torch.zeros(2, 3), reference) == 0.5
    # pairs across prompts do not count within prompts: a per-prompt offset changes concordance only
    shifted = reference + torch.tensor([[10.0], [0.0]])
    assert pairwise_agreement(shifted, reference) == 1.0
    assert concordance(shifted.flatten(), reference.flatten()) < 1.0
    assert torch.isnan(torch.tensor(pairwise_agreement(reference, torch.ones(2, 3))))


def test_kept_reference_per_rule():
    reference = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]])
    good = reference.clone()  # keeps the best of each prompt
    bad = -reference  # keeps the worst
    kept = kept_reference({"good": good, "bad": bad}, reference)
    assert kept["good"] == kept["reference"] == 1.0
    assert kept["bad"] == 0.0
    assert kept["random"] == pytest.approx(2.5 / 6)
    # rank sum: good ranks (3, 1, 2) and bad (1, 3, 2) tie everywhere in row 0; the first tie is kept
    assert kept["rank_sum"] == pytest.approx((0.0 + 1.0) / 2)
    assert kept_reference({"good": good, "bad": bad}, reference, rank_sum=["good"])["rank_sum"] == 1.0


class HalfSwapped(RenderingModule):
    """Renders every prompt exactly for even seeds and with its colours swapped for odd seeds."""

    def __init__(self):
        super().__init__()
        self.right, self.swapped = RenderingGenerator(), RenderingGenerator(swap_colours=True)

    def sample(self, prompts, seeds, sampling=None, **kwargs):
        outs = [(self.swapped if s % 2 else self.right).sample([p], [s]) for p, s in zip(prompts, seeds)]
        return type(outs[0])(torch.cat([o.latents for o in outs]), torch.cat([o.images for o in outs]), None, ())


class Negated(Reward):
    def __init__(self, reward: Reward):
        super().__init__()
        self.inner = reward

    def score(self, images, prompts):
        return -self.inner(images, prompts)


def test_judge_against_itself_and_its_negation_through_validate(tmp_path):
    prompts = tmp_path / "colour.txt"
    prompts.write_text("a red circle and a blue square\na green star and a yellow triangle\n")
    callback = RewardAgreement(rewards={"judge": JudgeReward(), "negated": Negated(JudgeReward())},
                               reference=JudgeReward(), prompts=[{"path": str(prompts)}], candidates=6, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(HalfSwapped(), dataloaders=torch.utils.data.DataLoader([0]))
    m = {k.removeprefix("val/rewards/"): float(v) for k, v in trainer.callback_metrics.items()}
    seeds_odd = [it.seed % 2 for it in callback.items]
    assert 0 < sum(seeds_odd) < len(seeds_odd)  # both kinds of candidates for the reference to tell apart
    assert m["judge/pairwise"] == 1.0 and m["negated/pairwise"] == 0.0
    assert m["kept/judge"] == m["kept/reference"] > m["kept/random"] > m["kept/negated"]
    rows = [json.loads(line) for line in (tmp_path / "reward_agreement" / "step_0.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == [it.key for it in callback.items]
    assert all(r["judge"] == r["reference"] == -r["negated"] for r in rows)
    right = [r["reference"] for r in rows if r["seed"] % 2 == 0]
    assert min(right) == 1.5  # an exact render meets every clause and answers every question
