"""DDIM (Song et al. 2020), as diffusers' DDIMScheduler: eta = 0 is deterministic, eta > 0 adds the passed noise."""

from __future__ import annotations

import numpy as np

from rtsd.schedulers.base import (
    Scheduler,
    SchedulerError,
    TrainSchedule,
    epsilon_from_prediction,
    spaced_timesteps,
    x0_from_prediction,
)


class DDIM(Scheduler):
    name = "ddim"
    diffusers_class = "DDIMScheduler"
    fixed_diffusers_keys = {"thresholding": False}

    def __init__(
        self,
        num_inference_steps: int,
        schedule: TrainSchedule | None = None,
        *,
        eta: float = 0.0,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        use_clipped_model_output: bool = False,
    ):
        super().__init__(num_inference_steps, schedule)
        if not eta >= 0:
            raise SchedulerError(f"ddim: eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
        self.eta = float(eta)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.use_clipped_model_output = bool(use_clipped_model_output)
        s = self.schedule
        self.timesteps = spaced_timesteps(
            s.timestep_spacing, num_inference_steps, s.num_train_timesteps, s.steps_offset
        )
        self.timesteps = self.timesteps.astype(np.int64)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def _step(self, model_output, i, x, noise):
        t = int(self.timesteps[i])
        # diffusers steps back by a fixed stride, whatever the spacing.
        prev_t = t - self.schedule.num_train_timesteps // self.num_inference_steps
        abar_t = float(self.alphas_cumprod[t])
        abar_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        alpha_t, sigma_t = abar_t**0.5, (1 - abar_t) ** 0.5

        x0 = x0_from_prediction(model_output, x, alpha_t, sigma_t, self.prediction_type)
        eps = epsilon_from_prediction(model_output, x, alpha_t, sigma_t, self.prediction_type)
        if self.clip_sample:
            x0 = x0.clip(-self.clip_sample_range, self.clip_sample_range)
        variance = ((1 - abar_prev) / (1 - abar_t)) * (1 - abar_t / abar_prev)
        std = self.eta * variance**0.5
        if self.use_clipped_model_output:
            eps = (x - alpha_t * x0) / sigma_t
        prev = abar_prev**0.5 * x0 + (1 - abar_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            prev = prev + std * noise
        return prev
