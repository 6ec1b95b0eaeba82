"""The ToyWorld judge as a reward: the oracle of the reward-based methods' positive controls.

A reward that knows the answer: if ARL selecting with it (or a method ranking with it) does not improve judged
alignment, the machinery is wrong; if it does and a learned reward does not, the learned reward is the limit.
Anything trained or selected with it is an **oracle upper bound**: it is the evaluation judge itself.
"""

from __future__ import annotations

import math

import torch

from t2i_align.rewards.base import Reward
from t2i_align.toyworld.evaluation.metrics import score_image
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.world import BACKGROUND, COLOURS, DIAMETER, STRIPE_SHADE, parse_prompt


class JudgeReward(Reward):
    """``all_clauses + tifa / 2`` of the image for its prompt, in [0, 1.5]: 1 for an image that meets every clause,
    plus half the share of the prompt's questions the judge answers right, so that partly right images are ordered
    too (and ``score >= 1`` exactly when every clause is met). Not differentiable (the judge reads detected objects).

    Args:
        judge: the ToyWorld judge (a default one when None).
    """

    differentiable = False

    def __init__(self, judge: ToyJudge | None = None) -> None:
        super().__init__()
        self.judge = judge or ToyJudge()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        found = self.judge.detect_batch(images.detach().float().cpu())
        scores = [score_image(parse_prompt(p), f) for p, f in zip(prompts, found)]
        return torch.tensor([s["all_clauses"] + s["tifa"] / 2 for s in scores], device=images.device)


class ColourPresenceReward(Reward):
    """A differentiable oracle for ReFL's positive control: does the image hold each named colour in the amount the
    prompt asks for, and no colour it does not name?

    Each pixel's soft membership of palette colour ``c`` is ``sigmoid((a - 1/2) / 0.05) * softmax_c(-r^2 / 0.01)``,
    with ``a`` how far the pixel lies along the line from the background to ``c`` (or to its stripe shade, whichever
    line is nearer) and ``r`` its distance from that line, both in units of the line's length: the judge's colour rule
    (nearest colour, at least half-way from the background) made smooth. A phrase expects ``count`` objects of its
    size's disc area (the small one's when unstated: either size is enough). The score is the mean over named colours
    of ``min(coverage, expected) / expected``, minus the coverage of colours the prompt does not name over the expected
    total (only when every phrase names its colour). It knows the world's palette and the prompt's colours: an
    **oracle**. It does not see shapes, stripes or positions, so it can fix a missing or wrongly coloured object but
    not a colour swapped between two shapes.
    """

    differentiable = True

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("background", torch.tensor(BACKGROUND, dtype=torch.float32) / 255, persistent=False)
        self.register_buffer("palette", torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255,
                             persistent=False)
        self.names = list(COLOURS)

    def coverage(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, colours]`` soft pixel counts, in 64-px canvas pixels; a stripe (the colour darkened to
        ``STRIPE_SHADE``) counts as its colour."""
        x = images.float().permute(0, 2, 3, 1)[..., None, :] - self.background  # B H W 1 3

        def line(tip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # position along bg -> tip, distance off it
            d = tip - self.background  # C 3
            along = (x * d).sum(-1) / (d * d).sum(-1)  # B H W C
            return along, (x - along[..., None] * d).norm(dim=-1) / d.norm(dim=-1)

        (a_plain, r_plain), (a_stripe, r_stripe) = line(self.palette), line(self.palette * STRIPE_SHADE)
        stripe = r_stripe < r_plain
        along, off = torch.where(stripe, a_stripe, a_plain), torch.where(stripe, r_stripe, r_plain)
        # each pixel goes to the colour whose line it lies nearest (softly), if it is at least half-way out on it
        member = torch.sigmoid((along - 0.5) / 0.05) * torch.softmax(-(off**2) / 0.01, dim=-1)
        return member.sum((1, 2)) * (64 / images.shape[-1]) * (64 / images.shape[-2])

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        coverage = self.coverage(images)
        scores = []
        for cov, prompt in zip(coverage, prompts):
            expected = torch.zeros(len(self.names), device=cov.device)
            phrases = parse_prompt(prompt).phrases
            for p in phrases:
                area = math.pi * (DIAMETER[p.size or "small"] / 2) ** 2  # unstated: either size is enough
                if p.colour:
                    expected[self.names.index(p.colour)] += p.count * area
            named = expected > 0
            if not named.any():
                scores.append(cov.sum() * 0)
                continue
            score = (torch.minimum(cov[named], expected[named]) / expected[named]).mean()
            if all(p.colour for p in phrases):
                score = score - cov[~named].sum() / expected.sum()
            scores.append(score)
        return torch.stack(scores)
