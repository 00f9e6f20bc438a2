"""DDPM ancestral sampling (Ho et al. 2020), as diffusers' DDPMScheduler with a fixed variance."""

from __future__ import annotations

import numpy as np

from rtsd.schedulers.base import Scheduler, SchedulerError, TrainSchedule, spaced_timesteps, x0_from_prediction

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


class DDPM(Scheduler):
    name = "ddpm"
    diffusers_class = "DDPMScheduler"
    fixed_diffusers_keys = {"thresholding": False}

    def __init__(
        self,
        num_inference_steps: int,
        schedule: TrainSchedule | None = None,
        *,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
    ):
        super().__init__(num_inference_steps, schedule)
        if variance_type not in VARIANCE_TYPES:
            raise SchedulerError(
                f"ddpm: unsupported variance_type {variance_type!r}; allowed values are "
                f"{', '.join(repr(v) for v in VARIANCE_TYPES)} (learned variances need a model that predicts them)"
            )
        self.variance_type = variance_type
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        s = self.schedule
        self.timesteps = spaced_timesteps(
            s.timestep_spacing, num_inference_steps, s.num_train_timesteps, s.steps_offset
        )
        self.timesteps = self.timesteps.astype(np.int64)
        self.init_noise_sigma = 1.0

    @property
    def stochastic(self) -> bool:
        return True

    def _step(self, model_output, i, x, noise):
        t = int(self.timesteps[i])
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        abar_t = float(self.alphas_cumprod[t])
        abar_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        alpha_t, sigma_t = abar_t**0.5, (1 - abar_t) ** 0.5
        current_alpha = abar_t / abar_prev
        current_beta = 1 - current_alpha

        x0 = x0_from_prediction(model_output, x, alpha_t, sigma_t, self.prediction_type)
        if self.clip_sample:
            x0 = x0.clip(-self.clip_sample_range, self.clip_sample_range)
        x0_coeff = abar_prev**0.5 * current_beta / (1 - abar_t)
        x_coeff = current_alpha**0.5 * (1 - abar_prev) / (1 - abar_t)
        prev = x0_coeff * x0 + x_coeff * x
        if t > 0:
            if self.variance_type == "fixed_large":
                std = current_beta**0.5
            else:  # fixed_small and fixed_small_log give the same std
                std = max((1 - abar_prev) / (1 - abar_t) * current_beta, 1e-20) ** 0.5
            prev = prev + std * noise
        return prev
