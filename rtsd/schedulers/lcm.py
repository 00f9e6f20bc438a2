"""Latent Consistency Model multistep sampling (Luo et al. 2023), as diffusers' LCMScheduler.

Each step predicts the clean sample through the consistency boundary condition and, except at the last step,
re-noises it to the next timestep with the passed noise. timestep_spacing and steps_offset are accepted (they are
diffusers config keys) and, as in diffusers, do not affect LCM's timesteps.
"""

from __future__ import annotations

import numpy as np

from rtsd.schedulers.base import Scheduler, SchedulerError, TrainSchedule, x0_from_prediction

SIGMA_DATA = 0.5


class LCM(Scheduler):
    name = "lcm"
    diffusers_class = "LCMScheduler"
    train_defaults = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    fixed_diffusers_keys = {"thresholding": False}

    def __init__(
        self,
        num_inference_steps: int,
        schedule: TrainSchedule | None = None,
        *,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        timestep_scaling: float = 10.0,
    ):
        super().__init__(num_inference_steps, schedule)
        num_train = self.schedule.num_train_timesteps
        if not 1 <= original_inference_steps <= num_train:
            raise SchedulerError(
                f"lcm: original_inference_steps must be between 1 and num_train_timesteps={num_train}, "
                f"got {original_inference_steps}"
            )
        if num_inference_steps > original_inference_steps:
            raise SchedulerError(
                f"lcm: num_inference_steps={num_inference_steps} must be <= original_inference_steps="
                f"{original_inference_steps} (LCM samples a subset of its distillation schedule)"
            )
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.timestep_scaling = float(timestep_scaling)
        # The distillation schedule (every k-th train timestep, descending), then n evenly spaced entries of it.
        k = num_train // original_inference_steps
        origin = (np.arange(1, original_inference_steps + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[picks].astype(np.int64)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0

    @property
    def stochastic(self) -> bool:
        return True

    def _step(self, model_output, i, x, noise):
        t = int(self.timesteps[i])
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        abar_t = float(self.alphas_cumprod[t])
        abar_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        scaled_t = t * self.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled_t**2 + SIGMA_DATA**2)
        c_out = scaled_t / (scaled_t**2 + SIGMA_DATA**2) ** 0.5

        x0 = x0_from_prediction(model_output, x, abar_t**0.5, (1 - abar_t) ** 0.5, self.prediction_type)
        if self.clip_sample:
            x0 = x0.clip(-self.clip_sample_range, self.clip_sample_range)
        denoised = c_out * x0 + c_skip * x
        if i == len(self.timesteps) - 1:
            return denoised
        return abar_prev**0.5 * denoised + (1 - abar_prev) ** 0.5 * noise
