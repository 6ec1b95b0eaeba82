"""How images are sampled: one settings type for methods (their training chains), evaluation callbacks and exports.

In a config it is one group wherever it appears, e.g. ``model.init_args.sampling``,
``trainer.callbacks[i].init_args.sampling`` or ``data.init_args.sampling``::

    sampling:
      num_inference_steps: 25
      guidance_scale: 5.0
      scheduler: ddim     # or ddpm
      eta: 0.0            # DDIM only: 0 deterministic, 1 DDPM-like noise
      resolution: null    # image side; null: the model's own (UNet sample size x VAE factor)

Each owner has its own defaults (ReFL trains at 40 steps without CFG, CoMat at 50 DDPM steps with CFG 7.5);
a config that sets one key keeps the owner's defaults for the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from t2i_align.common import ConfigError


class _HostTimesteps:
    """Keeps the timesteps as Python ints (``host_timesteps``) beside the device tensor ``timesteps``, so that a
    sampler can pass each step's timestep to :meth:`step` as an int. diffusers' steps given a device tensor compare
    and index with it (``prev_t >= 0``, DDPM's ``(timesteps == t).nonzero()``, ``if t > 0``), and on a GPU each of
    those waits for the device (a host sync) at every step; with an int the same arithmetic runs on the host.
    The values are those of diffusers' own ``set_timesteps`` (made on the CPU, then copied once)."""

    host_timesteps: tuple[int, ...] = ()

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs) -> None:
        super().set_timesteps(num_inference_steps, device=None, **kwargs)
        self.host_timesteps = tuple(int(t) for t in self.timesteps.tolist())  # CPU tensor: no device sync
        self._previous = dict(zip(self.host_timesteps, [*self.host_timesteps[1:], -1]))
        if device is not None:
            self.timesteps = self.timesteps.to(device)

    def draws_noise(self, timestep: int, eta: float = 0.0) -> bool:
        """Whether :meth:`step` at ``timestep`` (with DDIM's ``eta``) adds fresh noise."""
        raise NotImplementedError


class DDIMSampler(_HostTimesteps, DDIMScheduler):
    """diffusers' ``DDIMScheduler`` with host-side timesteps (:class:`_HostTimesteps`); its ``step`` already takes
    the noise as ``variance_noise``."""

    def draws_noise(self, timestep: int, eta: float = 0.0) -> bool:
        return eta > 0  # DDIMScheduler.step: ``if eta > 0:`` adds std_dev_t * noise


class DDPMSampler(_HostTimesteps, DDPMScheduler):
    """diffusers' ``DDPMScheduler`` with host-side timesteps (:class:`_HostTimesteps`) whose ``step`` also takes its
    noise as ``variance_noise`` (as ``DDIMScheduler.step`` does), so a sampler can draw every step's noise at once.

    With ``variance_noise`` the step is diffusers 0.42.1's ``DDPMScheduler.step`` operation for operation (the same
    results bit for bit, tests/diffusion/test_sampling_settings.py checks it); without it, diffusers' own step.
    """

    def draws_noise(self, timestep: int, eta: float = 0.0) -> bool:
        return timestep > 0  # DDPMScheduler.step: ``if t > 0:`` adds the variance noise

    def previous_timestep(self, timestep):
        previous = self.__dict__.get("_previous")
        if isinstance(timestep, int) and previous is not None and timestep in previous:
            return previous[timestep]  # as diffusers' search of self.timesteps, without a device tensor
        return super().previous_timestep(timestep)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, variance_noise: torch.Tensor | None = None):
        if variance_noise is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        # diffusers 0.42.1 schedulers/scheduling_ddpm.py DDPMScheduler.step, with the noise given
        t = timestep
        prev_t = self.previous_timestep(t)
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ["learned", "learned_range"]:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        else:
            predicted_variance = None
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        if self.config.prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        elif self.config.prediction_type == "sample":
            pred_original_sample = model_output
        elif self.config.prediction_type == "v_prediction":
            pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        else:
            raise ValueError(f"prediction_type given as {self.config.prediction_type} must be one of `epsilon`, "
                             "`sample` or `v_prediction` for the DDPMScheduler.")
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(-self.config.clip_sample_range,
                                                              self.config.clip_sample_range)
        pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample
        variance = 0
        if t > 0:
            variance_noise = variance_noise.to(model_output.dtype)
            if self.variance_type == "fixed_small_log":
                variance = self._get_variance(t, predicted_variance=predicted_variance) * variance_noise
            elif self.variance_type == "learned_range":
                variance = self._get_variance(t, predicted_variance=predicted_variance)
                variance = torch.exp(0.5 * variance) * variance_noise
            else:
                variance = (self._get_variance(t, predicted_variance=predicted_variance) ** 0.5) * variance_noise
        pred_prev_sample = pred_prev_sample + variance
        if not return_dict:
            return pred_prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)


SCHEDULERS = {"ddim": DDIMSampler, "ddpm": DDPMSampler}


def step_noise(generators: Sequence[torch.Generator], shape: Sequence[int], count: int, device: torch.device,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``count`` steps' noise ``[count, B, *shape[1:]]`` from one CPU generator per sample, drawn at once and moved to
    ``device`` in one copy: row ``s`` holds exactly what ``randn_tensor(shape, generator=generators)`` (diffusers'
    per-sample draws, as a scheduler's step makes them) returns at the ``s``-th of ``count`` calls in a row.

    A scheduler step that draws its own noise from CPU generators copies it to the device at every step, and each
    copy waits for the device's queue (PyTorch's blocking host-to-device copy); here the draws are the same calls in
    the same order per generator (so the same numbers), then one copy, asynchronous from pinned memory on CUDA.
    """
    one = (1, *shape[1:])
    pin = torch.device(device).type == "cuda"
    noise = torch.empty((count, len(generators), *shape[1:]), dtype=dtype, pin_memory=pin)
    for b, generator in enumerate(generators):
        for s in range(count):  # a generator's draws in step order: the sequence its per-step draws would give
            noise[s, b] = torch.randn(one, generator=generator, dtype=dtype)[0]
    return noise.to(device, non_blocking=pin)


@dataclass(frozen=True)
class SamplingSettings:
    """Sampler settings.

    Args:
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance scale (<= 1: no CFG, one UNet batch per step).
        scheduler: ``ddim`` or ``ddpm`` (built from the pipeline's scheduler config).
        eta: DDIM's eta (0: deterministic); ignored by DDPM.
        resolution: image side in pixels; None: the model's default.
    """

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: Literal["ddim", "ddpm"] = "ddim"
    eta: float = 0.0
    resolution: int | None = None

    def __post_init__(self) -> None:
        n = self.num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"sampling.num_inference_steps must be a whole number >= 1, got {n!r}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"sampling.scheduler must be one of {sorted(SCHEDULERS)}, got {self.scheduler!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"sampling.eta must be in [0, 1], got {self.eta!r}")
        if self.resolution is not None and (isinstance(self.resolution, bool) or not isinstance(self.resolution, int)
                                            or self.resolution < 1):
            raise ConfigError(f"sampling.resolution must be a whole number of pixels or null, got {self.resolution!r}")

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def replace(self, **changes: Any) -> SamplingSettings:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The settings as recorded in reports, export records and cache recipes."""
        return dataclasses.asdict(self)

    def make_scheduler(self, scheduler_config: dict, device=None):
        """A fresh scheduler of this kind with its timesteps set (schedulers keep per-call state: one per chain): a
        diffusers scheduler with its timesteps also on the host (:class:`DDIMSampler`, :class:`DDPMSampler`)."""
        scheduler = SCHEDULERS[self.scheduler].from_config(scheduler_config)
        scheduler.set_timesteps(self.num_inference_steps, device=device)
        return scheduler
