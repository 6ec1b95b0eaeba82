"""Assemble reward-ranked selection (FineRewards' ARL): rank the K candidates of a prompt under each
reward (1 = best, ties share the average of their ranks), sum the ranks over rewards, keep the smallest sum.

FineRewards' public notebook (Enderfga/FineRewards, ``FineRewards-RAFT.ipynb``, ``get_max_score``) sums argsort
*indices* instead of ranks and scores candidate ``i`` of a prompt against the batch's ``i``-th prompt; here each candidate is scored against its own prompt by the caller, and
ranks are proper ranks.
"""

from __future__ import annotations

from typing import Mapping

import torch


def average_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, 1 for the highest score; tied scores share their mean rank
    (``[0.2, 0.9, 0.9]`` -> ``[3, 1.5, 1.5]``). A NaN score (a reward that failed on that image) ranks last,
    below every number (NaN compares false with everything and would otherwise rank first)."""
    s = scores.double().nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    higher = (s.unsqueeze(-1) < s.unsqueeze(-2)).sum(-1)  # how many candidates score strictly higher
    ties = (s.unsqueeze(-1) == s.unsqueeze(-2)).sum(-1)  # including itself
    return (1 + higher + (ties - 1) / 2).double()


def rank_sum(scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum over rewards of :func:`average_ranks`; each value is ``[..., K]`` (same shape for every reward)."""
    if not scores:
        raise ValueError("rank_sum needs at least one reward's scores")
    shapes = {name: tuple(s.shape) for name, s in scores.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"every reward must score the same candidates, got shapes {shapes}")
    return sum(average_ranks(s) for s in scores.values())


def select_candidates(scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Index of the kept candidate along the last dimension: the smallest rank sum (the first on a tie)."""
    return rank_sum(scores).argmin(-1)
