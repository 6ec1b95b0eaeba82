"""Gradient policies: which denoising steps of a sampling chain carry gradient.

Sources: ``refl`` is ImageReward's ReFL (THUDM/ImageReward, ``ImageReward/ReFL.py``: 40 steps, one grad step
m ~ U[30, 39]); ``strided`` is CoMat's (Appendix E.1: gradient at 5 of the 50 DDPM steps; CaraJ7/CoMat,
``TrainableSDPipeline.py``, ``forward``: ``training_timesteps``, ``detach_gradient``); ``last_k`` is DRaFT-K
(Clark et al., ICLR 2024) and AlignProp's truncated backpropagation (mihirp1998/AlignProp,
``config/align_prop.py``: ``truncated_backprop``).

A policy turns the number of steps and a random number generator (``rng``) into a :class:`StepPlan`. The sampler
runs every other UNet call under ``no_grad``; from the first grad step on, the scheduler update
stays differentiable (the "skip path" from later latents back to that step's prediction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepPlan:
    grad_steps: frozenset[int]
    stop_at: int | None = None  # predict x0 in one step from x_t at this step and stop (ReFL)
    detach_input: bool = False  # detach the UNet input at grad steps (CoMat Algorithm 1 and its SDXL code)


def _randint(low: int, high: int, rng: torch.Generator | None) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=rng).item())


class GradientPolicy:
    """Base class; subclasses implement :meth:`plan`."""

    def plan(self, num_steps: int, rng: torch.Generator | None = None) -> StepPlan:
        raise NotImplementedError


class NoGrad(GradientPolicy):
    """Every step without gradient (evaluation, data generation)."""

    def plan(self, num_steps: int, rng: torch.Generator | None = None) -> StepPlan:
        return StepPlan(frozenset())


class ReFLPolicy(GradientPolicy):
    """ImageReward's ReFL: no-grad steps 0..m-1, one grad UNet call at step m ~ U[min_step, max_step],
    then a one-step x0 prediction. Defaults are ImageReward's code (T = 40, m in [30, 39])."""

    def __init__(self, min_step: int = 30, max_step: int = 39) -> None:
        if not 0 <= min_step <= max_step:
            raise ValueError(f"ReFL needs 0 <= min_step <= max_step, got {min_step}, {max_step}")
        self.min_step, self.max_step = min_step, max_step

    def plan(self, num_steps: int, rng: torch.Generator | None = None) -> StepPlan:
        if self.max_step >= num_steps:
            raise ValueError(f"ReFL max_step={self.max_step} must be < num_inference_steps={num_steps}")
        m = _randint(self.min_step, self.max_step, rng)
        return StepPlan(frozenset({m}), stop_at=m)


class Strided(GradientPolicy):
    """CoMat: K grad steps at s, s+stride, ..., with a random phase s in [0, stride-1]."""

    def __init__(self, num_grad_steps: int = 5, stride: int = 10, detach_input: bool = False) -> None:
        if num_grad_steps < 1 or stride < 1:
            raise ValueError("Strided needs num_grad_steps >= 1 and stride >= 1")
        self.num_grad_steps, self.stride, self.detach_input = num_grad_steps, stride, detach_input

    def plan(self, num_steps: int, rng: torch.Generator | None = None) -> StepPlan:
        span = (self.num_grad_steps - 1) * self.stride
        if span >= num_steps:
            raise ValueError(
                f"Strided with {self.num_grad_steps} grad steps every {self.stride} needs more than {span} "
                f"steps, got num_inference_steps={num_steps}"
            )
        phase = _randint(0, min(self.stride - 1, num_steps - 1 - span), rng)
        steps = frozenset(phase + k * self.stride for k in range(self.num_grad_steps))
        return StepPlan(steps, detach_input=self.detach_input)


class LastK(GradientPolicy):
    """DRaFT-K / AlignProp: gradient through the last K steps (K ~ U[1, k] when ``random_k``)."""

    def __init__(self, k: int = 1, random_k: bool = False) -> None:
        if k < 1:
            raise ValueError(f"LastK needs k >= 1, got {k}")
        self.k, self.random_k = k, random_k

    def plan(self, num_steps: int, rng: torch.Generator | None = None) -> StepPlan:
        k = _randint(1, self.k, rng) if self.random_k else self.k
        k = min(k, num_steps)
        return StepPlan(frozenset(range(num_steps - k, num_steps)))


class Fixed(GradientPolicy):
    """A plan made ahead (a method that must know the grad steps before sampling, e.g. to record attention at
    some of them)."""

    def __init__(self, plan: StepPlan) -> None:
        self._plan = plan

    def plan(self, num_steps: int, rng: torch.Generator | None = None) -> StepPlan:
        if any(s >= num_steps for s in self._plan.grad_steps):
            raise ValueError(f"planned grad steps {sorted(self._plan.grad_steps)} exceed num_inference_steps={num_steps}")
        return self._plan
