"""Euler ancestral (k-diffusion sample_euler_ancestral, eta = 1), as diffusers' EulerAncestralDiscreteScheduler."""

from __future__ import annotations

import numpy as np

from rtsd.schedulers.base import SigmaScheduler, TrainSchedule, denoised_from_sigma_prediction, discrete_sigma_timesteps
from rtsd.schedulers.euler import zero_snr_safe


class EulerAncestral(SigmaScheduler):
    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    prediction_types = ("epsilon", "v_prediction")  # diffusers raises NotImplementedError for "sample"
    train_defaults = {"timestep_spacing": "linspace"}

    def __init__(self, num_inference_steps: int, schedule: TrainSchedule | None = None):
        super().__init__(num_inference_steps, schedule)
        if self.schedule.rescale_betas_zero_snr:
            self.alphas_cumprod = zero_snr_safe(self.alphas_cumprod)
        self.timesteps, sigmas = discrete_sigma_timesteps(self.schedule, self.alphas_cumprod, num_inference_steps)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.init_noise_sigma = self._init_noise_sigma()

    @property
    def stochastic(self) -> bool:
        return True

    def _step(self, model_output, i, x, noise):
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x0 = denoised_from_sigma_prediction(model_output, x, sigma, self.prediction_type)
        # Split the move to sigma_next into a deterministic part (down) and fresh noise (up).
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (x - x0) / sigma
        return x + derivative * (sigma_down - sigma) + noise * sigma_up
