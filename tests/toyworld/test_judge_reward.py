"""The judge as a reward (oracle) and its differentiable colour-presence form."""

import random

import numpy as np
import torch

from t2i_align.toyworld.experts.judge_reward import ColourPresenceReward, JudgeReward
from t2i_align.toyworld.world import COMPOSITIONAL, Obj, parse_prompt, place, render


def image(prompt: str, seed: int = 0, change=None) -> torch.Tensor:
    scene = place(parse_prompt(prompt), COMPOSITIONAL, random.Random(seed))
    if change is not None:
        scene = type(scene)(scene.spec, tuple(change(list(scene.objects))))
    rendered, _ = render(scene)
    return torch.from_numpy(np.asarray(rendered).copy()).permute(2, 0, 1).float() / 255


def recolour(objects, colour="green"):
    o = objects[0]
    return [Obj(o.shape, colour, o.size, o.texture, o.x, o.y), *objects[1:]]


PROMPT = "a red circle and a blue square"
CASES = {"exact": None, "missing": lambda objs: objs[1:], "recoloured": recolour}


def test_the_judge_reward_ranks_exact_above_wrong():
    images = torch.stack([image(PROMPT, change=c) for c in CASES.values()])
    scores = JudgeReward()(images, [PROMPT] * 3)
    assert scores[0] == 1.5 and scores[1] < 1 and scores[2] < 1


def test_colour_presence_prefers_the_exact_render_and_has_a_gradient():
    reward = ColourPresenceReward()
    images = torch.stack([image(PROMPT, seed, change=c) for seed in range(4) for c in CASES.values()])
    images.requires_grad_(True)
    scores = reward(images, [PROMPT] * len(images)).view(4, 3)
    assert (scores[:, 0] > 0.8).all() and (scores[:, 0] > scores[:, 1] + 0.3).all(), scores
    assert (scores[:, 0] > scores[:, 2] + 0.3).all(), scores
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    # a blank canvas scores 0; a prompt without colours scores 0 whatever the image
    blank = torch.ones(1, 3, 64, 64) * torch.tensor([236, 236, 232]).view(1, 3, 1, 1) / 255
    assert reward(blank, [PROMPT]).abs().item() < 1e-3
    assert reward(images[:1].detach(), ["a circle and a square"]).item() == 0
