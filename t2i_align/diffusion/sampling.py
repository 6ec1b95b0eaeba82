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
from dataclasses import dataclass
from typing import Any, Literal

from diffusers import DDIMScheduler, DDPMScheduler

from t2i_align.common import ConfigError

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


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
        """A fresh scheduler of this kind with its timesteps set (schedulers keep per-call state: one per chain)."""
        scheduler = SCHEDULERS[self.scheduler].from_config(scheduler_config)
        scheduler.set_timesteps(self.num_inference_steps, device=device)
        return scheduler
