"""Shared pieces of the exponential-integrator multistep solvers (DPM-Solver++ 2M, its SDE variant, UniPC).

These solvers work in log-SNR time: with k-diffusion sigma s (x = alpha * (x0 + s * eps)), the VP coefficients are
alpha = 1 / sqrt(s^2 + 1), sigma = s * alpha, and lambda = log(alpha / sigma) = -log(s). The schedule (timesteps plus
one sigma per step and a final sigma) is computed exactly as diffusers' set_timesteps does, including its float32
tables, so the timesteps equal its own (tests assert array_equal; Karras timesteps, which pass through torch's
float32 rounding, agree to 1e-6 relative). Per-step coefficients are Python floats (float64 on the host).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rtsd.schedulers.base import (
    Scheduler,
    SchedulerError,
    TrainSchedule,
    karras_sigmas,
    sigma_to_t,
    sigmas_from,
    x0_from_prediction,
)

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclass(frozen=True)
class VPCoefficients:
    """alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of one k-diffusion sigma (lambda is +inf at sigma 0)."""

    alpha: float
    sigma: float
    lam: float

    @classmethod
    def of(cls, k_sigma: float) -> "VPCoefficients":
        alpha = 1.0 / math.sqrt(k_sigma * k_sigma + 1.0)
        return cls(alpha, k_sigma * alpha, math.inf if k_sigma == 0 else -math.log(k_sigma))


def solver_alphas_cumprod(schedule: TrainSchedule) -> np.ndarray:
    """alphas_cumprod as diffusers' multistep solvers hold it: zero-terminal-SNR keeps a tiny last value (2^-24)."""
    alphas_cumprod = schedule.alphas_cumprod()
    if schedule.rescale_betas_zero_snr:
        # An exact zero would make the first sigma infinite; diffusers clamps it the same way.
        alphas_cumprod = alphas_cumprod.copy()
        alphas_cumprod[-1] = 2.0**-24
    return alphas_cumprod


def _last_timestep(alphas_cumprod: np.ndarray, lambda_min_clipped: float) -> int:
    # Timesteps whose log-SNR falls below lambda_min_clipped are cut off the top of the schedule (float32 table).
    lambdas = np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(np.float32(1.0) - alphas_cumprod))
    return len(alphas_cumprod) - int(np.searchsorted(lambdas[::-1], lambda_min_clipped))


def _solver_spaced_timesteps(spacing: str, n: int, last_timestep: int, num_train: int, steps_offset: int) -> np.ndarray:
    # The multistep solvers space n + 1 points and drop the last (unlike base.spaced_timesteps' DDIM family).
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.arange(last_timestep, 0, -(num_train / n)).round().astype(np.int64) - 1
    raise SchedulerError(f"unknown timestep_spacing {spacing!r}; allowed values are 'leading', 'trailing', 'linspace'")


def solver_schedule(
    schedule: TrainSchedule,
    alphas_cumprod: np.ndarray,
    n: int,
    *,
    use_karras_sigmas: bool,
    final_sigmas_type: str,
    lambda_min_clipped: float = -math.inf,
    karras_final_is_table_min: bool = True,
    round_karras_cosine: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [n], sigmas float32 [n + 1]) as DPMSolverMultistep / UniPCMultistep ``set_timesteps``.

    The two diffusers classes differ in two details, passed as flags: with Karras sigmas and final_sigmas_type
    "sigma_min", DPM-Solver ends on the train table's smallest sigma and UniPC on the last Karras sigma
    (``karras_final_is_table_min``); and DPM-Solver leaves Karras timesteps unrounded (then truncated to int) for
    squaredcos_cap_v2 while UniPC always rounds (``round_karras_cosine``).
    """
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise SchedulerError(f"unknown final_sigmas_type {final_sigmas_type!r}; allowed values are 'zero', 'sigma_min'")
    num_train = schedule.num_train_timesteps
    last_timestep = _last_timestep(alphas_cumprod, lambda_min_clipped)
    timesteps = _solver_spaced_timesteps(schedule.timestep_spacing, n, last_timestep, num_train, schedule.steps_offset)
    table = sigmas_from(alphas_cumprod)  # float32, ascending with the train timestep
    if use_karras_sigmas:
        sigmas = karras_sigmas(float(table[0]), float(table[-1]), n)
        t = sigma_to_t(sigmas, np.log(table))
        if schedule.beta_schedule != "squaredcos_cap_v2" or round_karras_cosine:
            t = t.round()
        timesteps = t.astype(np.int64)
        final = float(table[0]) if karras_final_is_table_min else float(sigmas[-1])
    else:
        sigmas = np.interp(timesteps, np.arange(num_train), table)
        final = float(table[0])
    final = 0.0 if final_sigmas_type == "zero" else final
    return timesteps, np.concatenate([sigmas, [final]]).astype(np.float32)


class MultistepScheduler(Scheduler):
    """Common frame of the log-SNR multistep solvers: sigma schedule, x0 conversion, identity input scaling.

    Subclasses compute ``timesteps`` and ``sigmas`` (float32, one more than timesteps) in __init__ and keep their
    history of converted model outputs as instance state.
    """

    sigmas: np.ndarray

    def __init__(self, num_inference_steps: int, schedule: TrainSchedule | None = None):
        super().__init__(num_inference_steps, schedule)
        self.alphas_cumprod = solver_alphas_cumprod(self.schedule)
        self.init_noise_sigma = 1.0

    def coefficients(self, j: int) -> VPCoefficients:
        """alpha, sigma, lambda at sigmas[j] (j may be len(timesteps): the final sigma)."""
        return VPCoefficients.of(float(self.sigmas[j]))

    def predicted_x0(self, model_output, x, j: int):
        """The model output at index j converted to a clean-sample prediction (data prediction, 'x0')."""
        c = self.coefficients(j)
        return x0_from_prediction(model_output, x, c.alpha, c.sigma, self.prediction_type)

    def _add_noise(self, original, noise, i: int):
        # The noise level of index i is sigmas[i] (a Karras sigma need not sit on the train table).
        c = self.coefficients(i)
        return c.alpha * original + c.sigma * noise


def check_choice(scheduler: str, option: str, value, allowed: tuple) -> None:
    """Raise SchedulerError naming the option and its allowed values when ``value`` is not one of them."""
    if isinstance(value, bool) != isinstance(allowed[0], bool) or value not in allowed:
        raise SchedulerError(
            f"{scheduler}: unsupported {option}={value!r}; allowed values are {', '.join(repr(a) for a in allowed)}"
        )
