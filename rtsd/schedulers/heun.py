"""Heun's 2nd-order method (Karras et al. 2022, Algorithm 1 without churn), as diffusers' HeunDiscreteScheduler.

Two model evaluations per step: ``timesteps`` repeats every timestep after the first (2n - 1 entries), and the
step at an odd position (counted from the loop's start) is the correction of the Euler step before it.
"""

from __future__ import annotations

import numpy as np

from rtsd.schedulers.base import SigmaScheduler, TrainSchedule, denoised_from_sigma_prediction, discrete_sigma_timesteps


class Heun(SigmaScheduler):
    name = "heun"
    diffusers_class = "HeunDiscreteScheduler"
    order = 2
    train_defaults = {"beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "linspace"}
    unsupported_train_fields = ("rescale_betas_zero_snr",)
    fixed_diffusers_keys = {"use_exponential_sigmas": False, "use_beta_sigmas": False}

    def __init__(
        self,
        num_inference_steps: int,
        schedule: TrainSchedule | None = None,
        *,
        use_karras_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
    ):
        super().__init__(num_inference_steps, schedule)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        timesteps, sigmas = discrete_sigma_timesteps(
            self.schedule, self.alphas_cumprod, num_inference_steps, use_karras_sigmas
        )
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        self.timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)])
        self.init_noise_sigma = self._init_noise_sigma()
        # (derivative, dt, sample) of the Euler half of the current step; None when the next step is an Euler step.
        self.pending: tuple | None = None

    def _step(self, model_output, i, x, noise):
        first_order = self.pending is None
        if first_order:
            if i % 2 == 1:
                raise ValueError(
                    f"heun: index {i} is the correction half of a step; a loop must start at an even index"
                )
            sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        else:
            sigma, sigma_next = float(self.sigmas[i - 1]), float(self.sigmas[i])
        sigma_input = sigma if first_order else sigma_next  # the sigma the model was evaluated at
        x0 = denoised_from_sigma_prediction(model_output, x, sigma_input, self.prediction_type)
        if self.clip_sample:
            x0 = x0.clip(-self.clip_sample_range, self.clip_sample_range)
        if first_order:
            derivative = (x - x0) / sigma
            dt = sigma_next - sigma
            self.pending = (derivative, dt, x)
            return x + derivative * dt
        prev_derivative, dt, start = self.pending
        self.pending = None
        derivative = ((x - x0) / sigma_next + prev_derivative) / 2
        return start + derivative * dt
