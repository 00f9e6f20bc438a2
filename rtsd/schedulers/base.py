"""Shared pieces of the NumPy schedulers: train-time schedule tables, the TrainSchedule config, the Scheduler base.

Schedule tables follow diffusers' dtypes (betas and alphas_cumprod in float32, cumprod accumulated in float64 as
torch does) so timesteps and sigmas come out bit-identical to diffusers. Per-step scalars are read from those
tables on the host as Python floats: ``float32_array * python_float`` stays float32 under NumPy 2 promotion, and the
same step code runs on CuPy arrays because it only uses array operators and methods (``+ - * / **``, ``.clip``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from rtsd.errors import RtsdError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class SchedulerError(RtsdError, ValueError):
    """A scheduler option, name or step count that cannot be used (a ValueError, so callers may catch either)."""


def _choice(what: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SchedulerError(f"unknown {what} {value!r}; allowed values are {', '.join(repr(a) for a in allowed)}")


# ---------------------------------------------------------------------------------------------------------------
# Schedule tables (small pure functions, NumPy on the host)
# ---------------------------------------------------------------------------------------------------------------


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal's cosine alpha_bar, discretised in float64 Python math like diffusers' betas_for_alpha_bar.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def betas_for(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Training betas (float32, length num_train_timesteps) for one of BETA_SCHEDULES."""
    _choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps).astype(np.float32)
    if beta_schedule == "scaled_linear":
        root = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps).astype(np.float32)
        return root * root
    return _cosine_betas(num_train_timesteps)


def alphas_cumprod_from(betas: np.ndarray) -> np.ndarray:
    """Cumulative product of (1 - beta), float32; accumulated in float64 like torch.cumprod on float32 input."""
    alphas = np.float32(1.0) - np.asarray(betas, dtype=np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1); float32 in and out."""
    alphas_bar_sqrt = np.sqrt(alphas_cumprod_from(betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def sigmas_from(alphas_cumprod: np.ndarray) -> np.ndarray:
    """k-diffusion sigmas sqrt((1 - a) / a), ascending with the train timestep, in the table's dtype."""
    a = np.asarray(alphas_cumprod)
    return ((1 - a) / a) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, spaced as in Karras et al. 2022 (eq. 5); float64."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray | float, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional train timestep of each sigma: linear interpolation in log-sigma (as diffusers' _sigma_to_t)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def leading_timesteps(n: int, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """Descending multiples of num_train // n, plus steps_offset (float64, integral values)."""
    step_ratio = num_train_timesteps // n
    return (np.arange(0, n) * step_ratio).round()[::-1] + steps_offset


def trailing_timesteps(n: int, num_train_timesteps: int) -> np.ndarray:
    """Descending from num_train - 1, evenly spaced and rounded (float64, integral values)."""
    step_ratio = num_train_timesteps / n
    return np.round(np.arange(num_train_timesteps, 0, -step_ratio)) - 1


def linspace_timesteps(n: int, num_train_timesteps: int, rounded: bool = True) -> np.ndarray:
    """Descending linspace(0, num_train - 1, n); rounded (DDIM family) or fractional (Euler family); float64."""
    t = np.linspace(0, num_train_timesteps - 1, n)
    return (t.round() if rounded else t)[::-1].copy()


def spaced_timesteps(spacing: str, n: int, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """The common timestep spacings (float64, descending, integral values); see Lin et al. 2023, table 2."""
    _choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    if spacing == "leading":
        return leading_timesteps(n, num_train_timesteps, steps_offset)
    if spacing == "trailing":
        return trailing_timesteps(n, num_train_timesteps)
    return linspace_timesteps(n, num_train_timesteps)


def discrete_sigma_timesteps(
    schedule: TrainSchedule,
    alphas_cumprod: np.ndarray,
    n: int,
    use_karras_sigmas: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32, sigmas float64 without the final one) of diffusers' Euler/LMS/Heun family.

    The linspace spacing is fractional here (not rounded); sigmas are interpolated linearly in the timestep;
    Karras sigmas replace them and map back to fractional timesteps through ``sigma_to_t``.
    """
    spacing, num_train = schedule.timestep_spacing, schedule.num_train_timesteps
    if spacing == "linspace":
        timesteps = linspace_timesteps(n, num_train, rounded=False).astype(np.float32)
    elif spacing == "leading":
        timesteps = (np.arange(0, n) * (num_train // n)).round()[::-1].astype(np.float32)
        timesteps += np.float32(schedule.steps_offset)
    else:
        timesteps = trailing_timesteps(n, num_train).astype(np.float32)
    train_sigmas = sigmas_from(alphas_cumprod)
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    if use_karras_sigmas:
        lo = sigma_min if sigma_min is not None else float(sigmas[-1])
        hi = sigma_max if sigma_max is not None else float(sigmas[0])
        sigmas = karras_sigmas(lo, hi, n)
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas)).astype(np.float32)
    return timesteps, sigmas


# ---------------------------------------------------------------------------------------------------------------
# Prediction-type conversions (array operators only; scalars are Python floats)
# ---------------------------------------------------------------------------------------------------------------


def x0_from_prediction(model_output, x, alpha_t: float, sigma_t: float, prediction_type: str):
    """Predicted clean sample for x = alpha_t * x0 + sigma_t * eps (alpha_t = sqrt(abar), sigma_t = sqrt(1 - abar))."""
    if prediction_type == "epsilon":
        return (x - sigma_t * model_output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * x - sigma_t * model_output
    return model_output


def epsilon_from_prediction(model_output, x, alpha_t: float, sigma_t: float, prediction_type: str):
    """Predicted noise for x = alpha_t * x0 + sigma_t * eps."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * x
    return (x - alpha_t * model_output) / sigma_t


def denoised_from_sigma_prediction(model_output, x, sigma: float, prediction_type: str):
    """Predicted clean sample in k-diffusion parametrisation x = x0 + sigma * eps (model input scaled by c_in)."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return model_output


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSchedule:
    """The training noise schedule plus the timestep choices shared by every algorithm (diffusers config keys).

    Defaults are diffusers' common scheduler defaults; each algorithm overrides some (``Scheduler.train_defaults``).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None  # explicit betas override beta_start/end/schedule
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, (int, np.integer)):
            raise SchedulerError(f"num_train_timesteps must be an int, got {self.num_train_timesteps!r}")
        if self.num_train_timesteps < 2:
            raise SchedulerError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        _choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise SchedulerError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, (int, np.integer)):
            raise SchedulerError(f"steps_offset must be an int >= 0, got {self.steps_offset!r}")
        if self.steps_offset < 0:
            raise SchedulerError(f"steps_offset must be an int >= 0, got {self.steps_offset}")
        if self.trained_betas is not None:
            betas = tuple(float(b) for b in self.trained_betas)
            if len(betas) != self.num_train_timesteps or not all(0 < b < 1 for b in betas):
                raise SchedulerError(
                    f"trained_betas must hold num_train_timesteps={self.num_train_timesteps} values in (0, 1), "
                    f"got {len(betas)} values"
                )
            object.__setattr__(self, "trained_betas", betas)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def betas(self) -> np.ndarray:
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, dtype=np.float32)
        else:
            betas = betas_for(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def alphas_cumprod(self) -> np.ndarray:
        return alphas_cumprod_from(self.betas())


# ---------------------------------------------------------------------------------------------------------------
# Scheduler base
# ---------------------------------------------------------------------------------------------------------------


class Scheduler:
    """One generation's sampler. Subclasses set ``timesteps`` / ``init_noise_sigma`` in __init__ and implement _step.

    Contract: ``step(model_output, i, x, noise)`` with ``i`` an index into ``timesteps``. The first call may start at
    any index (img2img starts part-way); every later call must use the next index. Multistep history is ordinary
    instance state set by _step. Algorithm options are the keyword-only parameters of the subclass __init__, named
    exactly like diffusers' scheduler_config.json keys.
    """

    name: ClassVar[str] = ""
    diffusers_class: ClassVar[str] = ""
    order: ClassVar[int] = 1  # model evaluations per inference step (diffusers' `order`)
    prediction_types: ClassVar[tuple[str, ...]] = PREDICTION_TYPES
    # TrainSchedule fields whose diffusers default differs for this algorithm's class.
    train_defaults: ClassVar[dict[str, Any]] = {}
    # TrainSchedule fields this algorithm's diffusers class does not have: they must stay at their defaults.
    unsupported_train_fields: ClassVar[tuple[str, ...]] = ()
    # diffusers config keys accepted only with the given value (features rtsd does not implement), e.g.
    # {"thresholding": False}; create_from_diffusers_config rejects any other value with a clear error.
    fixed_diffusers_keys: ClassVar[dict[str, Any]] = {}

    timesteps: np.ndarray
    init_noise_sigma: float

    def __init__(self, num_inference_steps: int, schedule: TrainSchedule | None = None):
        schedule = schedule if schedule is not None else self.default_schedule()
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise SchedulerError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= schedule.num_train_timesteps:
            raise SchedulerError(
                f"num_inference_steps must be between 1 and num_train_timesteps={schedule.num_train_timesteps}, "
                f"got {num_inference_steps}"
            )
        if schedule.prediction_type not in self.prediction_types:
            raise SchedulerError(
                f"{self.name} does not support prediction_type {schedule.prediction_type!r}; "
                f"allowed values are {', '.join(repr(p) for p in self.prediction_types)}"
            )
        base = TrainSchedule()
        for key in self.unsupported_train_fields:
            if getattr(schedule, key) != getattr(base, key):
                raise SchedulerError(f"{self.name} does not support {key}={getattr(schedule, key)!r}")
        self.num_inference_steps = int(num_inference_steps)
        self.schedule = schedule
        self.prediction_type = schedule.prediction_type
        self.alphas_cumprod = schedule.alphas_cumprod()  # float32 table, as diffusers holds it
        self._next_index: int | None = None  # None until the first step: the loop may start at any index

    @classmethod
    def default_schedule(cls, **overrides: Any) -> TrainSchedule:
        return TrainSchedule(**{**cls.train_defaults, **overrides})

    @property
    def stochastic(self) -> bool:
        """True when ``step`` needs ``noise`` (same shape as x) on every call."""
        return False

    def __len__(self) -> int:
        return len(self.timesteps)

    # --- public API -----------------------------------------------------------------------------------------

    def scale_model_input(self, x, i: int):
        """The model input for index i (identity for DDPM-style schedulers, x / sqrt(sigma^2 + 1) for k-diffusion)."""
        self._check_index(i)
        return self._scale_model_input(x, int(i))

    def step(self, model_output, i: int, x, noise=None):
        """Advance from timesteps[i] using the model output at that index; returns the next sample."""
        self._check_index(i)
        self._check_arrays(model_output, x, noise)
        out = self._step(model_output, int(i), x, noise)
        self._next_index = int(i) + 1
        return out

    def add_noise(self, original, noise, i: int):
        """Noise a clean sample to the level the loop expects at index i (img2img); does not touch the loop state."""
        self._check_range(i)
        if original.shape != noise.shape:
            raise ValueError(
                f"add_noise: noise shape {tuple(noise.shape)} must equal original shape {tuple(original.shape)}"
            )
        return self._add_noise(original, noise, int(i))

    # --- for subclasses ---------------------------------------------------------------------------------------

    def _scale_model_input(self, x, i: int):
        return x

    def _step(self, model_output, i: int, x, noise):
        raise NotImplementedError

    def _add_noise(self, original, noise, i: int):
        # Variance-preserving forward process at the train timestep of index i.
        abar = float(self.alphas_cumprod[int(self.timesteps[i])])
        return abar**0.5 * original + (1 - abar) ** 0.5 * noise

    # --- checks -----------------------------------------------------------------------------------------------

    def _check_range(self, i: int) -> None:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"{self.name}: the step index must be an int index into timesteps, got {i!r}")
        if not 0 <= i < len(self.timesteps):
            raise ValueError(
                f"{self.name}: step index {i} is out of range; valid indices are 0..{len(self.timesteps) - 1}"
            )

    def _check_index(self, i: int) -> None:
        self._check_range(i)
        if self._next_index is not None and i != self._next_index:
            raise ValueError(
                f"{self.name}: step index {i} called out of order; the next index is {self._next_index} "
                "(create a new scheduler for a new generation)"
            )

    def _check_arrays(self, model_output, x, noise) -> None:
        if model_output.shape != x.shape:
            raise ValueError(
                f"{self.name}: model_output shape {tuple(model_output.shape)} must equal sample shape {tuple(x.shape)}"
            )
        if self.stochastic:
            if noise is None:
                raise ValueError(f"{self.name} is stochastic: pass noise=<array of shape {tuple(x.shape)}> to step")
            if noise.shape != x.shape:
                raise ValueError(
                    f"{self.name}: noise shape {tuple(noise.shape)} must equal sample shape {tuple(x.shape)}"
                )
        elif noise is not None:
            raise ValueError(f"{self.name} is deterministic (stochastic=False): pass noise=None to step")


class SigmaScheduler(Scheduler):
    """Base of the k-diffusion style samplers (Euler, Euler a, LMS, Heun): x = x0 + sigma * eps, input scaled by c_in.

    Subclasses set ``self.sigmas`` (float32, one per entry of ``timesteps`` plus the final sigma).
    """

    sigmas: np.ndarray

    def _init_noise_sigma(self) -> float:
        # diffusers: the largest sigma, or the std of x at that sigma for "leading" spacing.
        max_sigma = float(self.sigmas.max())
        return max_sigma if self.schedule.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5

    def _scale_model_input(self, x, i: int):
        sigma = float(self.sigmas[i])
        return x / (sigma**2 + 1) ** 0.5

    def _add_noise(self, original, noise, i: int):
        return original + noise * float(self.sigmas[i])
