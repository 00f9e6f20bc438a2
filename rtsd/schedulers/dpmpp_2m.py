"""DPM-Solver++(2M): diffusers' DPMSolverMultistepScheduler with algorithm_type="dpmsolver++" (Lu et al. 2022).

A second-order multistep exponential integrator in data prediction: each step combines the current x0 prediction
with the previous one (the only history kept). The first step, and the last step when asked, fall back to first order.
"""

from __future__ import annotations

import math

from rtsd.schedulers.base import TrainSchedule
from rtsd.schedulers.multistep import FINAL_SIGMAS_TYPES, MultistepScheduler, check_choice, solver_schedule

SOLVER_TYPES = ("midpoint", "heun")
# diffusers silently maps other solvers' solver_type values onto "midpoint"; from_config relies on it.
_SOLVER_TYPE_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


class DPMPP2M(MultistepScheduler):
    name = "dpmpp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    train_defaults = {"timestep_spacing": "linspace"}
    fixed_diffusers_keys = {
        "algorithm_type": "dpmsolver++",
        "thresholding": False,
        "variance_type": None,
        "use_lu_lambdas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
    }

    def __init__(
        self,
        num_inference_steps: int,
        schedule: TrainSchedule | None = None,
        *,
        solver_order: int = 2,
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -math.inf,
    ):
        super().__init__(num_inference_steps, schedule)
        solver_type = _SOLVER_TYPE_ALIASES.get(solver_type, solver_type)
        check_choice(self.name, "solver_order", solver_order, (2, 1))
        check_choice(self.name, "solver_type", solver_type, SOLVER_TYPES)
        check_choice(self.name, "final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        for option, value in (
            ("lower_order_final", lower_order_final),
            ("euler_at_final", euler_at_final),
            ("use_karras_sigmas", use_karras_sigmas),
        ):
            check_choice(self.name, option, value, (True, False))
        self.solver_order = int(solver_order)
        self.solver_type = solver_type
        self.lower_order_final = lower_order_final
        self.euler_at_final = euler_at_final
        self.final_sigmas_type = final_sigmas_type
        self.timesteps, self.sigmas = solver_schedule(
            self.schedule,
            self.alphas_cumprod,
            self.num_inference_steps,
            use_karras_sigmas=use_karras_sigmas,
            final_sigmas_type=final_sigmas_type,
            lambda_min_clipped=float(lambda_min_clipped),
        )
        self._previous_x0 = None  # x0 prediction of the previous step: the multistep history

    def _uses_first_order(self, i: int) -> bool:
        n = len(self.timesteps)
        # The last step falls back to first order when asked (few steps), and always onto sigma 0: the log-SNR step
        # there is infinite and only the first-order update has a limit.
        final_first_order = i == n - 1 and (
            self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
        )
        # A zero-length step (Karras sigmas ending on sigma_min) is the identity, which the first-order update gives
        # exactly; the second-order one divides by h = 0 (diffusers' heun variant returns NaN there).
        zero_length = self.sigmas[i + 1] == self.sigmas[i]
        return self.solver_order == 1 or self._previous_x0 is None or final_first_order or zero_length

    def _step(self, model_output, i: int, x, noise):
        x0 = self.predicted_x0(model_output, x, i)
        if self._uses_first_order(i):
            out = self._first_order_update(x0, i, x, noise)
        else:
            out = self._second_order_update(x0, self._previous_x0, i, x, noise)
        self._previous_x0 = x0
        return out

    def _log_snr_steps(self, i: int):
        # (target, current) coefficients and h = lambda_t - lambda_s, the log-SNR step from sigmas[i] to sigmas[i+1].
        t, s = self.coefficients(i + 1), self.coefficients(i)
        return t, s, t.lam - s.lam

    def _first_order_update(self, x0, i: int, x, noise):
        t, s, h = self._log_snr_steps(i)
        return (t.sigma / s.sigma) * x - (t.alpha * math.expm1(-h)) * x0

    def _second_order_update(self, x0, previous_x0, i: int, x, noise):
        t, s, h = self._log_snr_steps(i)
        r0 = (s.lam - self.coefficients(i - 1).lam) / h
        d1 = (1.0 / r0) * (x0 - previous_x0)
        phi = t.alpha * math.expm1(-h)
        if self.solver_type == "midpoint":
            return (t.sigma / s.sigma) * x - phi * x0 - (0.5 * phi) * d1
        return (t.sigma / s.sigma) * x - phi * x0 + (t.alpha * (math.expm1(-h) / h + 1.0)) * d1
