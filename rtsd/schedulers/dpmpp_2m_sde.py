"""DPM-Solver++(2M) SDE: diffusers' DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++".

The same multistep frame and history as DPM-Solver++(2M), with the stochastic update of Lu et al. 2022 (eq. for
SDE-DPM-Solver++): part of the noise is replaced by fresh Gaussian noise each step, so ``step`` needs ``noise``.
This is not diffusers' DPMSolverSDEScheduler (k-diffusion's DPM++ SDE with a Brownian tree and two model calls).
"""

from __future__ import annotations

import math

from rtsd.schedulers.dpmpp_2m import DPMPP2M


class DPMPP2MSDE(DPMPP2M):
    name = "dpmpp_2m_sde"
    fixed_diffusers_keys = {**DPMPP2M.fixed_diffusers_keys, "algorithm_type": "sde-dpmsolver++"}

    @property
    def stochastic(self) -> bool:
        return True

    def _first_order_update(self, x0, i: int, x, noise):
        t, s, h = self._log_snr_steps(i)
        decay = -math.expm1(-2.0 * h)  # 1 - exp(-2h): the share of the sample re-drawn this step
        return (t.sigma / s.sigma * math.exp(-h)) * x + (t.alpha * decay) * x0 + (t.sigma * math.sqrt(decay)) * noise

    def _second_order_update(self, x0, previous_x0, i: int, x, noise):
        t, s, h = self._log_snr_steps(i)
        r0 = (s.lam - self.coefficients(i - 1).lam) / h
        d1 = (1.0 / r0) * (x0 - previous_x0)
        decay = -math.expm1(-2.0 * h)
        if self.solver_type == "midpoint":
            d1_weight = 0.5 * (t.alpha * decay)
        else:
            d1_weight = t.alpha * (decay / (-2.0 * h) + 1.0)
        return (
            (t.sigma / s.sigma * math.exp(-h)) * x
            + (t.alpha * decay) * x0
            + d1_weight * d1
            + (t.sigma * math.sqrt(decay)) * noise
        )
