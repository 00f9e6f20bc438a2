"""PLMS (pseudo linear multistep, Liu et al. 2022): diffusers' PNDMScheduler with skip_prk_steps=True, SD's default.

``timesteps`` has num_inference_steps + 1 entries: the second model evaluation repeats the second timestep to
correct the first (Heun-like) step, as in diffusers.
"""

from __future__ import annotations

import numpy as np

from rtsd.schedulers.base import (
    Scheduler,
    SchedulerError,
    TrainSchedule,
    epsilon_from_prediction,
    leading_timesteps,
    linspace_timesteps,
    trailing_timesteps,
)


class PNDM(Scheduler):
    name = "pndm"
    diffusers_class = "PNDMScheduler"
    prediction_types = ("epsilon", "v_prediction")
    unsupported_train_fields = ("rescale_betas_zero_snr",)

    def __init__(
        self,
        num_inference_steps: int,
        schedule: TrainSchedule | None = None,
        *,
        skip_prk_steps: bool = True,
        set_alpha_to_one: bool = False,
    ):
        super().__init__(num_inference_steps, schedule)
        if not skip_prk_steps:
            raise SchedulerError("pndm: only skip_prk_steps=True (PLMS, SD's default) is implemented")
        s, n = self.schedule, num_inference_steps
        if s.timestep_spacing == "leading":
            ascending = leading_timesteps(n, s.num_train_timesteps, s.steps_offset)[::-1]
        elif s.timestep_spacing == "trailing":
            ascending = trailing_timesteps(n, s.num_train_timesteps)[::-1]
        else:
            ascending = linspace_timesteps(n, s.num_train_timesteps)[::-1]
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        self.timesteps = plms.astype(np.int64)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        # Multistep history: the last (up to 4) model outputs, the sample the correction step restarts from,
        # and how many steps this generation has taken.
        self.model_outputs: list = []
        self.first_sample = None
        self.steps_taken = 0

    def _step(self, model_output, i, x, noise):
        stride = self.schedule.num_train_timesteps // self.num_inference_steps
        t = int(self.timesteps[i])
        prev_t = t - stride
        if self.steps_taken == 1:
            # The correction step: redo the first step (from its sample and timestep) with averaged outputs.
            prev_t, t = t, t + stride
        else:
            self.model_outputs = self.model_outputs[-3:] + [model_output]
        e = self.model_outputs
        if self.steps_taken == 0:
            direction = model_output
            self.first_sample = x
        elif self.steps_taken == 1:
            direction = (model_output + e[-1]) / 2
            x, self.first_sample = self.first_sample, None
        elif len(e) == 2:
            direction = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            direction = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            direction = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) * (1 / 24)
        self.steps_taken += 1
        return self._prev_sample(x, t, prev_t, direction)

    def _prev_sample(self, x, t: int, prev_t: int, model_output):
        # Formula (9) of the PNDM paper, on epsilon.
        abar_t = float(self.alphas_cumprod[t])
        abar_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        eps = epsilon_from_prediction(model_output, x, abar_t**0.5, (1 - abar_t) ** 0.5, self.prediction_type)
        x_coeff = (abar_prev / abar_t) ** 0.5
        denom = abar_t * (1 - abar_prev) ** 0.5 + (abar_t * (1 - abar_t) * abar_prev) ** 0.5
        return x_coeff * x - ((abar_prev - abar_t) / denom) * eps
