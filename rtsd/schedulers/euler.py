"""Euler (Karras et al. 2022, Algorithm 2 without churn), as diffusers' EulerDiscreteScheduler."""

from __future__ import annotations

import numpy as np

from rtsd.schedulers.base import (
    SchedulerError,
    SigmaScheduler,
    TrainSchedule,
    denoised_from_sigma_prediction,
    discrete_sigma_timesteps,
)

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def zero_snr_safe(alphas_cumprod: np.ndarray) -> np.ndarray:
    # With zero terminal SNR the last sigma would be infinite; diffusers' Euler family clamps abar to 2**-24.
    out = alphas_cumprod.copy()
    out[-1] = 2.0**-24
    return out


class Euler(SigmaScheduler):
    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    train_defaults = {"timestep_spacing": "linspace"}
    fixed_diffusers_keys = {
        "interpolation_type": "linear",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "timestep_type": "discrete",
    }

    def __init__(
        self,
        num_inference_steps: int,
        schedule: TrainSchedule | None = None,
        *,
        use_karras_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        final_sigmas_type: str = "zero",
    ):
        super().__init__(num_inference_steps, schedule)
        if final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise SchedulerError(
                f"euler: unknown final_sigmas_type {final_sigmas_type!r}; allowed values are 'zero', 'sigma_min'"
            )
        if self.schedule.rescale_betas_zero_snr:
            self.alphas_cumprod = zero_snr_safe(self.alphas_cumprod)
        self.timesteps, sigmas = discrete_sigma_timesteps(
            self.schedule, self.alphas_cumprod, num_inference_steps, use_karras_sigmas, sigma_min, sigma_max
        )
        abar0 = self.alphas_cumprod[0]
        last = ((1 - abar0) / abar0) ** 0.5 if final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.init_noise_sigma = self._init_noise_sigma()

    def _step(self, model_output, i, x, noise):
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x0 = denoised_from_sigma_prediction(model_output, x, sigma, self.prediction_type)
        derivative = (x - x0) / sigma
        return x + derivative * (sigma_next - sigma)
