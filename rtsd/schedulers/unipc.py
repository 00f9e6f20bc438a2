"""UniPC: diffusers' UniPCMultistepScheduler (Zhao et al. 2023), data prediction (predict_x0=True), B(h) = bh1/bh2.

Each step first corrects the sample it was handed (UniC: it re-solves the previous step with the model output just
computed at its end), then predicts the next sample (UniP) from the last ``solver_order`` x0 predictions. The
corrector costs no extra model call. History (x0 predictions, the pre-corrector sample, the last order) is instance
state of the one generation.
"""

from __future__ import annotations

import math

import numpy as np

from rtsd.schedulers.base import SchedulerError, TrainSchedule
from rtsd.schedulers.multistep import FINAL_SIGMAS_TYPES, MultistepScheduler, check_choice, solver_schedule

SOLVER_TYPES = ("bh2", "bh1")
# diffusers silently maps DPM-Solver's solver_type values onto "bh2"; from_config relies on it.
_SOLVER_TYPE_ALIASES = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}


class UniPC(MultistepScheduler):
    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    train_defaults = {"timestep_spacing": "linspace"}
    fixed_diffusers_keys = {
        "predict_x0": True,
        "thresholding": False,
        "solver_p": None,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
    }

    def __init__(
        self,
        num_inference_steps: int,
        schedule: TrainSchedule | None = None,
        *,
        solver_order: int = 2,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: tuple[int, ...] | list[int] = (),
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
    ):
        super().__init__(num_inference_steps, schedule)
        solver_type = _SOLVER_TYPE_ALIASES.get(solver_type, solver_type)
        check_choice(self.name, "solver_order", solver_order, (2, 1, 3))
        check_choice(self.name, "solver_type", solver_type, SOLVER_TYPES)
        check_choice(self.name, "final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        check_choice(self.name, "lower_order_final", lower_order_final, (True, False))
        check_choice(self.name, "use_karras_sigmas", use_karras_sigmas, (True, False))
        if not all(isinstance(j, (int, np.integer)) and not isinstance(j, bool) for j in disable_corrector):
            raise SchedulerError(
                f"{self.name}: disable_corrector must be a list of step indices, got {disable_corrector!r}"
            )
        if final_sigmas_type == "zero" and solver_order > 1 and not lower_order_final:
            # A higher-order step onto sigma 0 divides by an infinite log-SNR step (diffusers returns inf).
            raise SchedulerError(
                f"{self.name}: final_sigmas_type='zero' needs lower_order_final=True when solver_order > 1; "
                "set lower_order_final=True or final_sigmas_type='sigma_min'"
            )
        self.solver_order = int(solver_order)
        self.solver_type = solver_type
        self.lower_order_final = lower_order_final
        self.disable_corrector = frozenset(int(j) for j in disable_corrector)
        self.timesteps, self.sigmas = solver_schedule(
            self.schedule,
            self.alphas_cumprod,
            self.num_inference_steps,
            use_karras_sigmas=use_karras_sigmas,
            final_sigmas_type=final_sigmas_type,
            karras_final_is_table_min=False,
            round_karras_cosine=True,
        )
        self._x0_history: list = []  # x0 predictions of the last solver_order steps, oldest first
        self._last_sample = None  # the sample the previous predictor started from (the corrector re-solves it)
        self._last_order = 0

    def _step(self, model_output, i: int, x, noise):
        x0 = self.predicted_x0(model_output, x, i)
        if i > 0 and (i - 1) not in self.disable_corrector and self._last_sample is not None:
            x = self._correct(x0, i)
        self._x0_history = (self._x0_history + [x0])[-self.solver_order :]
        order = min(self.solver_order, len(self.timesteps) - i) if self.lower_order_final else self.solver_order
        order = min(order, len(self._x0_history))  # warm-up: no more history than steps taken
        self._last_sample, self._last_order = x, order
        return self._predict(i, x, order)

    def _differences(self, j: int, h: float, lam0: float, m0, order: int):
        # Scaled differences D1_k = (m_k - m0) / r_k of older x0 predictions, r_k = (lambda_k - lambda_0) / h,
        # where history entry -(k + 1) was predicted at index j - k.
        rks, d1s = [], []
        for k in range(1, order):
            rk = (self.coefficients(j - k).lam - lam0) / h
            rks.append(rk)
            d1s.append((self._x0_history[-(k + 1)] - m0) / rk)
        return rks, d1s

    def _b_of_h(self, h: float) -> tuple[float, float]:
        """(h * phi_1(-h), B(h)) for a log-SNR step h: expm1(-h), and -h (bh1) or expm1(-h) (bh2)."""
        h_phi_1 = math.expm1(-h)
        return h_phi_1, (-h if self.solver_type == "bh1" else h_phi_1)

    def _order_conditions(self, h: float, rks: list[float]) -> tuple[np.ndarray, np.ndarray]:
        """R and b of the UniPC order conditions R rho = b (host-side float64); nodes are rks plus 1."""
        hh = -h
        h_phi_1, b_h = self._b_of_h(h)
        nodes = [*rks, 1.0]
        r = np.array([[node**p for node in nodes] for p in range(len(nodes))], dtype=np.float64)
        b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1
        for k in range(1, len(nodes) + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        return r, np.array(b, dtype=np.float64)

    def _predict(self, i: int, x, order: int):
        """UniP: from sigmas[i] to sigmas[i + 1] with the last ``order`` x0 predictions."""
        t, s0 = self.coefficients(i + 1), self.coefficients(i)
        h = t.lam - s0.lam
        m0 = self._x0_history[-1]
        h_phi_1, b_h = self._b_of_h(h)
        x_next = (t.sigma / s0.sigma) * x - (t.alpha * h_phi_1) * m0
        if order == 1 or h == 0:
            # No higher-order term (h == 0: a zero-length step, e.g. Karras sigmas ending on sigma_min). diffusers
            # adds B(h) times an explicit zero, which is NaN for bh1 on a final step onto sigma 0 (B(h) = -inf);
            # the limit is this x_next.
            return x_next
        rks, d1s = self._differences(i, h, s0.lam, m0, order)
        r, b = self._order_conditions(h, rks)
        rhos = [0.5] if order == 2 else [float(v) for v in np.linalg.solve(r[:-1, :-1], b[:-1])]
        return x_next - (t.alpha * b_h) * _weighted_sum(rhos, d1s)

    def _correct(self, x0, i: int):
        """UniC: the sample at index i re-solved from the previous one (sigmas[i-1] -> sigmas[i]) using ``x0`` too."""
        order = self._last_order
        t, s0 = self.coefficients(i), self.coefficients(i - 1)
        h = t.lam - s0.lam
        m0 = self._x0_history[-1]
        h_phi_1, b_h = self._b_of_h(h)
        if h == 0:  # a zero-length step: nothing to correct
            return 1.0 * self._last_sample
        rks, d1s = self._differences(i - 1, h, s0.lam, m0, order)
        rhos = [0.5] if order == 1 else [float(v) for v in np.linalg.solve(*self._order_conditions(h, rks))]
        correction = rhos[-1] * (x0 - m0)
        if d1s:
            correction = _weighted_sum(rhos[:-1], d1s) + correction
        return (t.sigma / s0.sigma) * self._last_sample - (t.alpha * h_phi_1) * m0 - (t.alpha * b_h) * correction


def _weighted_sum(weights: list[float], arrays: list):
    total = weights[0] * arrays[0]
    for w, a in zip(weights[1:], arrays[1:]):
        total = total + w * a
    return total
